"""Model adapters against computations by hand, bit-exact save/load, presets, the frozen-backbone recipe, errors."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertConfig, CLIPModel, DistilBertConfig, ResNetConfig, ViTConfig

from cliptrace.data.transforms import ImageTransform
from cliptrace.models import (
    HFCLIP,
    PRESETS,
    DualEncoder,
    FrozenBackboneDualEncoder,
    OpenCLIPAdapter,
    build_config,
    load_model,
    train_tokenizer,
)
from cliptrace.models.base import LOGIT_SCALE_MAX

CAPTIONS = [
    "a red circle above a small blue square",
    "two green triangles left of a yellow star",
    "a large purple square below a tiny orange circle",
    # longer than 32 tokens: truncated, EOS kept last
    "the blue circle is right of the red triangle and the green square is below the yellow star " * 2,
]
OTHER_TEXTS = ["Crème brûlée", "赤い丸", "دائرة حمراء", "🐱🚀"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 3, vocab_size=320, context_length=32)


def hf_clip(preset: str, act: str) -> Callable:
    return lambda tok: HFCLIP.from_preset(preset, tok, hidden_act=act, seed=0)


def frozen_resnet_distilbert(tok) -> FrozenBackboneDualEncoder:
    vision = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    text = DistilBertConfig(
        vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, pad_token_id=0
    )
    return FrozenBackboneDualEncoder.from_configs(
        vision, text, tok, preprocess=ImageTransform(32), projection_dim=16, seed=0
    )


def frozen_vit_bert(tok) -> FrozenBackboneDualEncoder:
    vision = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    text = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return FrozenBackboneDualEncoder.from_configs(vision, text, tok, projection_dim=16, seed=0)


ADAPTERS = {
    "hf-tiny-quick_gelu": hf_clip("tiny", "quick_gelu"),
    "hf-tiny-gelu": hf_clip("tiny", "gelu"),
    "hf-small-quick_gelu": hf_clip("small", "quick_gelu"),
    "hf-small-gelu": hf_clip("small", "gelu"),
    "frozen-resnet-distilbert": frozen_resnet_distilbert,
    "frozen-vit-bert": frozen_vit_bert,
}
HF_ADAPTERS = [name for name in ADAPTERS if name.startswith("hf-")]
FROZEN_ADAPTERS = [name for name in ADAPTERS if name.startswith("frozen-")]


@pytest.fixture(scope="module")
def cached(tokenizer) -> Callable[[str], DualEncoder]:
    """Build each adapter once, in eval mode, for the tests that only read it."""
    built: dict[str, DualEncoder] = {}

    def get(name: str) -> DualEncoder:
        if name not in built:
            built[name] = ADAPTERS[name](tokenizer).eval()
        return built[name]

    return get


def pixels(model: DualEncoder, n: int = 3) -> torch.Tensor:
    size = model.preprocess.size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert torch.equal(first[key], second[key]), key


# --- every adapter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTERS)
def test_embeddings_have_shape_b_by_d_and_unit_norm(cached, name: str) -> None:
    model = cached(name)
    images = torch.stack([model.preprocess(Image.new("RGB", (40, 30), (200, 30, 30))), *pixels(model, 2)])
    tokens = model.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(**tokens)
        raw_image = model.encode_image(images, normalize=False)
        raw_text = model.encode_text(**tokens, normalize=False)
    assert image.shape == text.shape == (3, image.shape[1])
    assert tokens["input_ids"].shape == (3, model.context_length)
    torch.testing.assert_close(image.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(image, raw_image / raw_image.norm(dim=1, keepdim=True))
    torch.testing.assert_close(text, raw_text / raw_text.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("name", ADAPTERS)
def test_forward_gives_features_and_exp_scale_whose_products_are_the_logits(cached, name: str) -> None:
    model = cached(name)
    images, tokens = pixels(model), model.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        image, text, scale = model(images, tokens["input_ids"], tokens["attention_mask"])
        assert torch.equal(image, model.encode_image(images))
        assert torch.equal(text, model.encode_text(**tokens))
    assert scale.item() == pytest.approx(math.exp(model.logit_scale.item()), rel=1e-6)
    by_hand = torch.tensor(
        [[scale.item() * sum(float(a) * float(b) for a, b in zip(image[i], text[j])) for j in range(3)]
         for i in range(3)]
    )
    torch.testing.assert_close(scale * image @ text.T, by_hand)
    if isinstance(model, HFCLIP):  # HF computes its own logits along its own path
        with torch.no_grad():
            reference = model.model(pixel_values=images, **tokens).logits_per_image
        torch.testing.assert_close(scale * image @ text.T, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["hf-tiny-quick_gelu", *FROZEN_ADAPTERS])
@pytest.mark.parametrize("start, expected", [(7.0, LOGIT_SCALE_MAX), (-0.5, 0.0), (2.0, 2.0)])
def test_clamp_logit_scale_clamps_to_zero_and_ln_100(tokenizer, name: str, start: float, expected: float) -> None:
    model = ADAPTERS[name](tokenizer)
    with torch.no_grad():
        model.logit_scale.fill_(start)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(expected)
    assert LOGIT_SCALE_MAX == pytest.approx(math.log(100))


@pytest.mark.parametrize("name", ADAPTERS)
def test_save_load_round_trip_is_bit_exact(cached, name: str, tmp_path) -> None:
    model = cached(name)
    model.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model").eval()
    assert type(loaded) is type(model)
    assert_same_weights(model, loaded)
    assert loaded.preprocess == model.preprocess
    assert loaded.context_length == model.context_length
    image = Image.new("RGB", (50, 37), (10, 200, 90))
    assert torch.equal(loaded.preprocess(image), model.preprocess(image))
    texts = CAPTIONS + OTHER_TEXTS
    tokens, loaded_tokens = model.tokenize(texts), loaded.tokenize(texts)
    assert torch.equal(tokens["input_ids"], loaded_tokens["input_ids"])
    assert torch.equal(tokens["attention_mask"], loaded_tokens["attention_mask"])
    images = pixels(model)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(**tokens), model.encode_text(**tokens))
    manifest = json.loads((tmp_path / "model" / "cliptrace_model.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["preprocess"] == {
        "size": model.preprocess.size, "mean": list(model.preprocess.mean), "std": list(model.preprocess.std)
    }


# --- HF CLIP: pooling by hand --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HF_ADAPTERS)
def test_text_embedding_is_projection_of_final_state_at_eos(cached, tokenizer, name: str) -> None:
    model = cached(name)
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        hidden = model.model.text_model(**tokens).last_hidden_state
        embedding = model.encode_text(**tokens, normalize=False)
    for row, ids in enumerate(tokens["input_ids"].tolist()):
        eos = ids.index(tokenizer.eos_token_id)
        assert eos != max(range(len(ids)), key=ids.__getitem__)  # pooling at argmax(ids) would differ
        expected = model.model.text_projection(hidden[row, eos])
        torch.testing.assert_close(embedding[row], expected)
        assert ids[eos + 1 :] == [tokenizer.pad_token_id] * (len(ids) - eos - 1)  # EOS ends every text


@pytest.mark.parametrize("name", HF_ADAPTERS)
def test_image_embedding_is_projection_of_post_layernorm_cls_state(cached, name: str) -> None:
    model = cached(name)
    images = pixels(model)
    vision = model.model.vision_model
    with torch.no_grad():
        cls_state = vision(pixel_values=images).last_hidden_state[:, 0]
        expected = model.model.visual_projection(vision.post_layernorm(cls_state))
        torch.testing.assert_close(model.encode_image(images, normalize=False), expected)


def test_hidden_act_reaches_every_layer(cached) -> None:
    for name, act in [("hf-tiny-quick_gelu", "QuickGELUActivation"), ("hf-tiny-gelu", "GELUActivation")]:
        model = cached(name)
        activations = {type(m.activation_fn).__name__ for m in model.model.modules() if hasattr(m, "activation_fn")}
        assert activations == {act}


def test_eager_attention_returns_attention_maps(tokenizer) -> None:
    model = HFCLIP.from_preset("tiny", tokenizer, attn_implementation="eager", seed=0)
    with torch.no_grad():
        output = model.model.vision_model(pixel_values=pixels(model, 1), output_attentions=True)
    tokens = (64 // 8) ** 2 + 1
    assert len(output.attentions) == model.model.config.vision_config.num_hidden_layers
    assert output.attentions[0].shape == (1, 4, tokens, tokens)
    torch.testing.assert_close(output.attentions[0].sum(-1), torch.ones(1, 4, tokens))


def test_seed_makes_initialization_reproducible(tokenizer) -> None:
    assert_same_weights(HFCLIP.from_preset("tiny", tokenizer, seed=3), HFCLIP.from_preset("tiny", tokenizer, seed=3))
    a, b = HFCLIP.from_preset("tiny", tokenizer), HFCLIP.from_preset("tiny", tokenizer)
    assert not torch.equal(a.model.visual_projection.weight, b.model.visual_projection.weight)


@pytest.mark.parametrize(
    "preprocessor, expected",
    [
        ({"size": 32, "crop_size": 32, "image_mean": [0.5] * 3, "image_std": [0.25] * 3},
         ImageTransform(32, (0.5,) * 3, (0.25,) * 3)),
        ({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
          "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]},
         ImageTransform(32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))),
        (None, ImageTransform(32)),
    ],
    ids=["legacy-ints", "size-dicts", "absent"],
)
def test_plain_hf_directory_loads_with_declared_preprocessing(tokenizer, tmp_path, preprocessor, expected) -> None:
    config = build_config("tiny", tokenizer, image_size=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    if preprocessor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    loaded = load_model(tmp_path).eval()
    assert isinstance(loaded, HFCLIP)
    assert loaded.preprocess == expected
    assert_same_weights(clip, loaded.model)
    images = pixels(loaded, 2)
    with torch.no_grad():
        expected_features = F.normalize(clip.get_image_features(pixel_values=images).pooler_output, dim=-1)
        torch.testing.assert_close(loaded.encode_image(images), expected_features, rtol=0, atol=0)
    assert loaded.tokenize(CAPTIONS)["input_ids"].tolist() == [
        tokenizer(text, padding="max_length", truncation=True, max_length=32)["input_ids"] for text in CAPTIONS
    ]


# --- presets -----------------------------------------------------------------------------------------------


def test_base_preset_has_openai_vit_b_32_parameter_count() -> None:
    with torch.device("meta"):
        model = CLIPModel(build_config("base"))
    assert sum(p.numel() for p in model.parameters()) == 151_277_313


def test_presets_take_vocabulary_and_ids_from_the_tokenizer(tokenizer) -> None:
    assert PRESETS == ("tiny", "small", "base")
    for name in PRESETS:
        text = build_config(name, tokenizer).text_config
        assert text.vocab_size == len(tokenizer)
        assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
        )


@pytest.mark.parametrize("name, context_length", [("tiny", 32), ("small", 77), ("base", 77)])
def test_preset_context_length_is_the_text_tower_length(tokenizer, name: str, context_length: int) -> None:
    assert HFCLIP.preset_context_length(name) == context_length
    assert build_config(name, tokenizer).text_config.max_position_embeddings == context_length


def test_preset_overrides_reach_the_config(tokenizer) -> None:
    config = build_config("tiny", tokenizer, image_size=48, hidden_act="gelu", vision_num_hidden_layers=1,
                          text_hidden_size=64, projection_dim=32, logit_scale_init_value=1.0)
    assert config.vision_config.image_size == 48
    assert config.vision_config.num_hidden_layers == 1
    assert config.text_config.hidden_size == 64
    assert config.vision_config.hidden_act == config.text_config.hidden_act == "gelu"
    assert config.projection_dim == 32 and config.logit_scale_init_value == 1.0


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("huge", {}, "unknown preset 'huge'"),
        ("tiny", {"hidden_act": "relu"}, "hidden_act='relu'"),
        ("tiny", {"vision_no_such_field": 1}, "unknown override 'vision_no_such_field'"),
        ("tiny", {"image_size": 60}, "image_size=60 is not a multiple of patch_size=8"),
    ],
)
def test_build_config_rejects_bad_arguments(tokenizer, name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_config(name, tokenizer, **kwargs)


# --- frozen-backbone dual encoder --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FROZEN_ADAPTERS)
def test_frozen_pooling_is_mean_image_state_and_masked_mean_text_state(cached, name: str) -> None:
    model = cached(name)
    images, tokens = pixels(model), model.tokenize(CAPTIONS)
    with torch.no_grad():
        image_state = model.vision(pixel_values=images).last_hidden_state
        text_state = model.text(**tokens).last_hidden_state
        if image_state.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            image_state = image_state.flatten(2).transpose(1, 2)
        image_pooled = torch.stack([sum(row) / len(row) for row in image_state])
        text_pooled = []
        for row, mask in zip(text_state, tokens["attention_mask"].tolist()):
            kept = [row[t] for t, keep in enumerate(mask) if keep]
            text_pooled.append(sum(kept) / len(kept))
        torch.testing.assert_close(
            model.encode_image(images, normalize=False), model.visual_projection(image_pooled)
        )
        torch.testing.assert_close(
            model.encode_text(**tokens, normalize=False), model.text_projection(torch.stack(text_pooled))
        )


@pytest.mark.parametrize("name", FROZEN_ADAPTERS)
def test_one_training_step_changes_only_heads_and_scale(tokenizer, name: str) -> None:
    model = ADAPTERS[name](tokenizer).train()
    assert not any(module.training for module in [*model.vision.modules(), *model.text.modules()])
    assert model.visual_projection.training
    assert not any(p.requires_grad for p in [*model.vision.parameters(), *model.text.parameters()])
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    images, tokens = pixels(model, 4), model.tokenize(CAPTIONS)
    image, text, scale = model(images, tokens["input_ids"], tokens["attention_mask"])
    logits, labels = scale * image @ text.T, torch.arange(4)
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).backward()
    optimizer.step()
    changed = {key for key, value in model.state_dict().items() if not torch.equal(before[key], value)}
    assert changed == {"visual_projection.weight", "text_projection.weight", "log_scale"}
    with torch.no_grad():  # backbones in eval mode: dropout off, so encodings repeat exactly
        assert torch.equal(model.encode_text(**tokens), model.encode_text(**tokens))


def test_frozen_from_pretrained_directories_reuses_backbones(cached, tmp_path) -> None:
    model = cached("frozen-vit-bert")
    model.save(tmp_path / "saved")
    rebuilt = FrozenBackboneDualEncoder.from_pretrained(
        tmp_path / "saved" / "vision", tmp_path / "saved" / "text", preprocess=model.preprocess, projection_dim=16
    )
    assert_same_weights(model.vision, rebuilt.vision)
    assert_same_weights(model.text, rebuilt.text)
    assert rebuilt.tokenize(CAPTIONS)["input_ids"].tolist() == model.tokenize(CAPTIONS)["input_ids"].tolist()
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        FrozenBackboneDualEncoder.from_pretrained(tmp_path / "saved" / "vision", tmp_path / "saved" / "text")


def test_frozen_from_configs_needs_an_image_size(tokenizer) -> None:
    with pytest.raises(ValueError, match="ResNetConfig.*image_size"):
        FrozenBackboneDualEncoder.from_configs(ResNetConfig(), DistilBertConfig(vocab_size=len(tokenizer)), tokenizer)


# --- model directory errors --------------------------------------------------------------------------------


def write_manifest(directory, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": 1, "adapter": "hf_clip", "context_length": 32,
                "preprocess": ImageTransform(32).to_dict()} | fields
    (directory / "cliptrace_model.json").write_text(json.dumps(manifest))


def test_load_model_names_a_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"adapter": "mystery"}, "unknown adapter 'mystery'"),
        ({"format_version": 2}, "format_version 2 is newer"),
        ({"preprocess": {"size": 32}}, "key 'preprocess' is malformed"),
    ],
)
def test_load_model_rejects_a_bad_manifest_naming_the_directory(tmp_path, fields: dict, message: str) -> None:
    write_manifest(tmp_path / "model", **fields)
    with pytest.raises(ValueError, match=f"{tmp_path / 'model'}.*{message}"):
        load_model(tmp_path / "model")


def test_load_model_rejects_a_manifest_that_is_not_json(tmp_path) -> None:
    (tmp_path / "cliptrace_model.json").write_text("{not json")
    with pytest.raises(ValueError, match="cliptrace_model.json: not valid JSON"):
        load_model(tmp_path)


def test_load_model_rejects_a_directory_without_model(tmp_path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path}: not a model directory"):
        load_model(tmp_path)


def test_load_model_rejects_a_plain_directory_of_another_model_type(tmp_path) -> None:
    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    bert.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}: config.json has model_type 'bert'"):
        load_model(tmp_path)


def test_adapter_loaders_refuse_another_adapters_directory(tmp_path) -> None:
    write_manifest(tmp_path / "frozen", adapter="frozen_dual_encoder", projection_dim=16)
    write_manifest(tmp_path / "hf", adapter="hf_clip")
    with pytest.raises(ValueError, match="frozen: holds a frozen_dual_encoder model"):
        HFCLIP.from_pretrained(tmp_path / "frozen")
    with pytest.raises(ValueError, match="hf: not a frozen_dual_encoder model directory"):
        FrozenBackboneDualEncoder.load(tmp_path / "hf")


# --- open_clip (optional; with open_clip installed: tests/test_open_clip.py) --------------------------------


def test_open_clip_adapter_explains_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ImportError, match=r"pip install 'cliptrace\[open_clip\]'.*torchvision"):
        OpenCLIPAdapter.from_open_clip("ViT-B-32")
