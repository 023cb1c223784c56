"""The SigLIP adapter against hand computations and HF's own forward pass, bit-exact save/load, and the pipeline
(training, evaluation, TRAK) on a SigLIP model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cliptrace.models import HFCLIP, SIGLIP_PRESETS, SigLIPAdapter, load_model, train_tokenizer
from cliptrace.objectives import SIGMOID

CAPTIONS = ["a red circle above a small blue square", "two green triangles left of a yellow star",
            "a large purple square below a tiny orange circle", "a blue star"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)


def tiny_siglip(tokenizer, seed: int = 0, **overrides) -> SigLIPAdapter:
    settings = dict(image_size=16, vision_num_hidden_layers=1, text_num_hidden_layers=1, vision_hidden_size=32,
                    vision_intermediate_size=64, text_hidden_size=32, text_intermediate_size=64,
                    text_max_position_embeddings=48)
    return SigLIPAdapter.from_preset("siglip-tiny", tokenizer, seed=seed, **{**settings, **overrides})


def _inputs(model: SigLIPAdapter, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    size = model.preprocess.size
    return torch.randn(n, 3, size, size, generator=generator), model.tokenize(CAPTIONS[:n])


def _attention_pool(head: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention-pooling head by hand: one learned query attends over all tokens, then LN + MLP residual."""
    attention = head.attention
    width, heads = attention.embed_dim, attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.split(width)
    b_q, b_k, b_v = attention.in_proj_bias.split(width)
    query = (head.probe[0] @ w_q.T + b_q).reshape(1, heads, -1)
    keys = (states @ w_k.T + b_k).reshape(states.shape[0], -1, heads, width // heads)
    values = (states @ w_v.T + b_v).reshape(states.shape[0], -1, heads, width // heads)
    weights = torch.softmax(torch.einsum("qhd,bthd->bhqt", query, keys) / math.sqrt(width // heads), -1)
    pooled = torch.einsum("bhqt,bthd->bqhd", weights, values).reshape(states.shape[0], width)
    pooled = pooled @ attention.out_proj.weight.T + attention.out_proj.bias
    return pooled + head.mlp(head.layernorm(pooled))


def test_presets_and_initialization(tokenizer) -> None:
    assert SIGLIP_PRESETS == ("siglip-tiny", "siglip-small", "siglip-base")
    model = tiny_siglip(tokenizer)
    assert model.objective is SIGMOID
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.std == (0.5, 0.5, 0.5)
    assert SigLIPAdapter.preset_context_length("siglip-base") == 64
    with pytest.raises(ValueError, match="unknown SigLIP preset 'tiny'"):
        SigLIPAdapter.from_preset("tiny", tokenizer)
    with pytest.raises(ValueError, match="unknown override 'projection_dim'"):
        SigLIPAdapter.from_preset("siglip-tiny", tokenizer, projection_dim=8)


def test_embeddings_equal_hand_computation(tokenizer) -> None:
    model = tiny_siglip(tokenizer).double().eval()
    images, tokens = _inputs(model)
    images = images.double()
    vision = model.model.vision_model
    states = vision.post_layernorm(vision.encoder(vision.embeddings(images)).last_hidden_state)
    expected_image = F.normalize(_attention_pool(vision.head, states), dim=-1)
    torch.testing.assert_close(model.encode_image(images), expected_image, rtol=1e-10, atol=1e-12)

    text = model.model.text_model
    hidden = text.final_layer_norm(text.encoder(text.embeddings(input_ids=tokens["input_ids"])).last_hidden_state)
    expected_text = F.normalize(text.head(hidden[:, -1]), dim=-1)  # the last position, every position attended
    torch.testing.assert_close(model.encode_text(tokens["input_ids"], tokens["attention_mask"]), expected_text,
                               rtol=1e-10, atol=1e-12)
    assert tokens["input_ids"].shape[1] == model.context_length and not tokens["attention_mask"].all()  # padded
    assert torch.equal(model.encode_text(tokens["input_ids"], torch.ones_like(tokens["attention_mask"])),
                       model.encode_text(tokens["input_ids"], tokens["attention_mask"]))


def test_forward_gives_the_logits_of_hf_siglip(tokenizer) -> None:
    model = tiny_siglip(tokenizer).double().eval()
    with torch.no_grad():
        model.logit_bias.fill_(-2.5)
    images, tokens = _inputs(model)
    image, text, scale, bias = model(images.double(), tokens["input_ids"], tokens["attention_mask"])
    reference = model.model(input_ids=tokens["input_ids"], pixel_values=images.double(), return_loss=True)
    torch.testing.assert_close(SIGMOID.logits(image, text, scale, bias), reference.logits_per_image, rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(SIGMOID.loss(image, text, scale, bias), reference.loss, rtol=1e-10, atol=1e-12)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


def test_save_load_is_bit_exact(tokenizer, tmp_path: Path) -> None:
    model = tiny_siglip(tokenizer).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-3.25)
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert isinstance(loaded, SigLIPAdapter)
    _assert_same_weights(model, loaded)
    assert loaded.preprocess == model.preprocess and loaded.context_length == model.context_length
    images, tokens = _inputs(model)
    for first, second in zip(model(images, **tokens), loaded(images, **tokens)):
        assert torch.equal(first, second)
    assert torch.equal(loaded.tokenize(CAPTIONS)["input_ids"], model.tokenize(CAPTIONS)["input_ids"])


def test_plain_huggingface_directory_loads_as_siglip(tokenizer, tmp_path: Path) -> None:
    model = tiny_siglip(tokenizer)
    model.model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert isinstance(loaded, SigLIPAdapter)
    _assert_same_weights(model, loaded)
    assert loaded.preprocess.size == 16 and loaded.preprocess.mean == (0.5, 0.5, 0.5)


def test_other_directories_are_refused(tokenizer, tmp_path: Path) -> None:
    HFCLIP.from_preset("tiny", tokenizer, image_size=16, vision_num_hidden_layers=1,
                       text_num_hidden_layers=1).save(tmp_path / "clip")
    with pytest.raises(ValueError, match="holds a hf_clip model"):
        SigLIPAdapter.from_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "cliptrace_model.json").unlink()
    with pytest.raises(ValueError, match="model_type 'clip', expected 'siglip'"):
        SigLIPAdapter.from_pretrained(tmp_path / "clip")
