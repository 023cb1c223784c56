"""The SigLIP adapter against hand computations and HF's own forward pass, bit-exact save/load, and the pipeline
(training, evaluation, TRAK) on a SigLIP model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

import cliptrace
from cliptrace.data.images import ImageLoader
from cliptrace.data.pairs import PairDataset, make_collate
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.evaluate import evaluate
from cliptrace.evaluate.query import text_query
from cliptrace.models import HFCLIP, SIGLIP_PRESETS, SigLIPAdapter, load_model, train_tokenizer
from cliptrace.models.base import LOGIT_SCALE_MAX
from cliptrace.objectives import SIGMOID
from cliptrace.train import TrainConfig, initial_model, list_checkpoints, train
from cliptrace.trak import AttributionSettings, SigmoidPairLogit
from cliptrace.trak.clip_call import eager_attention
from cliptrace.trak.factored import FactoredFeaturizer
from cliptrace.trak.outputs import output_for_objective, output_for_task
from cliptrace.verify.retrain import target_outputs
from test_distributed import _global_batch as distributed_batch, _gradients as training_gradients
from test_trak_factored import loop_gradients, reference_block, relative_error

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


# --- TRAK features: factored against exact -------------------------------------------------------------------


def test_factored_features_equal_projected_exact_gradients(tokenizer) -> None:
    model = tiny_siglip(tokenizer).double().eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.logit_bias.fill_(-1.0)  # Q = 1 − σ(f) away from 0
        for name, parameter in model.named_parameters():  # non-trivial LayerNorm and bias values
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    images, tokens = _inputs(model)
    batch, indices = (images.double(), tokens), torch.tensor([1, -1, 7])
    output = SigmoidPairLogit()
    featurizer = FactoredFeaturizer(model, output, proj_dim=None, layer_dim=6, other_parameters="exact")
    head = "model.vision_model.head.attention."
    # the attention-pooling head's nn.MultiheadAttention is not a hooked layer: its parameters take the exact path
    assert {head + "in_proj_weight", head + "out_proj.weight", "model.vision_model.head.probe",
            "model.logit_bias", "model.logit_scale"} <= set(featurizer.other_names)
    assert not any(layer.name.startswith("model.vision_model.head.attention") for layer in featurizer.layers)
    names = featurizer.parameter_names + featurizer.other_names
    with eager_attention(model):
        features, weights = featurizer.features(batch, indices)
        exact = loop_gradients(output, model, names, batch, indices)
        f, _ = SIGMOID.pair_output(*model(batch[0], **tokens))  # the same attention kernel as the features
    torch.testing.assert_close(weights, 1 - torch.sigmoid(f.detach()), rtol=1e-12, atol=1e-12)
    sizes = dict(model.named_parameters())
    columns, start = {}, 0
    for name in names:
        columns[name] = slice(start, start + sizes[name].numel())
        start += sizes[name].numel()
    slices = featurizer.layer_slices()
    assert {type(layer.module).__name__ for layer in featurizer.layers} >= {"Linear", "LayerNorm", "Embedding"}
    for layer in featurizer.layers:
        gradient = torch.cat([exact[:, columns[name]] for name in layer.parameter_names], 1)
        expected = torch.stack([reference_block(layer, row) for row in gradient])
        assert expected.norm() > 0, layer.name
        assert relative_error(features[:, slices[layer.name]], expected) < 1e-10, layer.name
    other = torch.cat([exact[:, columns[name]] for name in featurizer.other_names], 1)
    assert other.norm() > 0
    torch.testing.assert_close(features[:, slices["other"]], other, rtol=1e-10, atol=1e-12)


# --- the pipeline on a SigLIP run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shapes world of 40 images with 2 planted near-duplicates, and a 2-checkpoint run of a small SigLIP on it
    (started from a model directory, as ``cliptrace train --model DIR``)."""
    root = tmp_path_factory.mktemp("siglip_run")
    world = generate_shapes_world(root / "world", n_images=40, seed=5, n_duplicates=2, image_size=32)
    captions = [caption for record in select_split(load_records(world), "train") for caption in record.captions]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=32)
    tiny_siglip(tokenizer, image_size=32, text_max_position_embeddings=32).save(root / "init")
    train(TrainConfig(data=str(world), out=str(root / "run"), model=str(root / "init"), epochs=4, batch_size=8,
                      warmup_steps=1, lr=1e-3, save_every=2, eval_split=None, progress=False))
    return world, root / "run"


def _hf_sigmoid_loss(model: SigLIPAdapter, records: list) -> float:
    """HF SiglipModel's own sigmoid loss on the records' first captions (one batch)."""
    dataset = PairDataset(records, model.preprocess, loader=ImageLoader(), caption_choice="first")
    batch = make_collate(model.tokenize)([dataset[i] for i in range(len(records))])
    with torch.no_grad():
        return float(model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                 return_loss=True).loss)


def test_training_lowers_the_sigmoid_loss_and_trains_the_bias(siglip_run: tuple[Path, Path]) -> None:
    world, run = siglip_run
    config = TrainConfig.load(run / "config.json")
    initial, final = initial_model(config), load_model(run / "model")
    assert isinstance(final, SigLIPAdapter) and isinstance(initial, SigLIPAdapter)
    records = select_split(load_records(world), "train")[:16]
    assert _hf_sigmoid_loss(final, records) < _hf_sigmoid_loss(initial, records)
    assert initial.logit_bias.item() == -10.0 and final.logit_bias.item() != -10.0
    assert 0.0 <= final.logit_scale.item() <= LOGIT_SCALE_MAX
    with open(run / "train.csv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert float(rows[-1]["logit_bias"]) == pytest.approx(final.logit_bias.item())
    assert [path.name for path in list_checkpoints(run)] == ["epoch-0002", "epoch-0004"]


def test_two_process_training_step_gives_the_one_process_gradients(siglip_run: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    """The sigmoid loss through Fabric's DDP: the bias comes out of the wrapped forward, so DDP averages its gradient
    with the others (the harness of the CLIP test in test_distributed.py)."""
    world, run = siglip_run
    batch = distributed_batch(world, load_model(run / "model"))
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    training_gradients(Fabric(accelerator="cpu", devices=1), str(run / "model"), batch, one)
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(training_gradients, str(run / "model"), batch,
                                                                     two)
    single, distributed = torch.load(one), torch.load(two)
    assert single.keys() == distributed.keys()
    assert single["model.logit_bias"].abs().max() > 0 and single["model.logit_scale"].abs().max() > 0
    for name, gradient in single.items():
        torch.testing.assert_close(distributed[name], gradient, rtol=1e-9, atol=1e-12, msg=name)


def test_zero_shot_ranks_by_sigmoid_probabilities(siglip_run: tuple[Path, Path]) -> None:
    world, run = siglip_run
    model = load_model(run / "model").eval()
    records = [record for record in load_records(world) if record.label is not None]
    templates = ("a {}.", "a photo of a {}.")
    metrics = evaluate(model, records, ImageLoader(), templates=templates)
    classnames = sorted({record.label for record in records})
    with torch.no_grad():
        images = torch.cat([model.encode_image(model.preprocess(ImageLoader().load(r.image))[None]) for r in records])
        classes = []
        for name in classnames:
            prompts = model.tokenize([template.format(name) for template in templates])
            classes.append(F.normalize(model.encode_text(**prompts).mean(0), dim=-1))
        probabilities = torch.sigmoid(model.logit_scale.exp() * images @ torch.stack(classes).T + model.logit_bias)
    labels = torch.tensor([classnames.index(record.label) for record in records])
    top1 = 100.0 * (probabilities.argmax(-1) == labels).double().mean().item()
    assert metrics["zeroshot_top1"] == pytest.approx(top1)
    assert metrics["zeroshot_n_images"] == len(records)
    captions = [(position, caption) for position, record in enumerate(records) for caption in record.captions]
    with torch.no_grad():
        texts = model.encode_text(**model.tokenize([caption for _, caption in captions]))
        caption_probabilities = torch.sigmoid(model.logit_scale.exp() * images @ texts.T + model.logit_bias)
    best = [captions[int(column)][0] for column in caption_probabilities.argmax(-1)]
    i2t_r1 = 100.0 * sum(owner == position for position, owner in enumerate(best)) / len(records)
    assert metrics["i2t_R@1"] == pytest.approx(i2t_r1)


def test_text_query_reports_sigmoid_probabilities(siglip_run: tuple[Path, Path]) -> None:
    world, run = siglip_run
    model = load_model(run / "model").eval()
    records = select_split(load_records(world), "test")
    result = text_query(model, records[0].captions[0], records, ImageLoader(), k=3)
    expected = torch.sigmoid(model.logit_scale.exp() * result.similarities + model.logit_bias).detach()
    torch.testing.assert_close(result.probabilities, expected)
    assert result.matches[0].probability == pytest.approx(float(expected.max()))


@pytest.mark.parametrize("features", ["factored", "exact"])
def test_trak_finds_the_planted_duplicate(siglip_run: tuple[Path, Path], features: str, tmp_path: Path) -> None:
    world, run = siglip_run
    plan = json.loads((world.parent / "planted.json").read_text(encoding="utf-8"))
    train_records = select_split(load_records(world), "train")
    by_id = {record.id: record for record in train_records}
    originals = [by_id[item["original"]] for item in plan["duplicates"]]
    settings = AttributionSettings(proj_dim=256, batch_size=8, features=features)
    result = cliptrace.attribute(run, train_records, originals, settings=settings, store_dir=tmp_path / "store",
                                 top_k=3)
    top = [result.train[int(row[0])].id for row in result.top.proponents]
    assert top == [item["duplicate"] for item in plan["duplicates"]]


def test_verify_outputs_are_the_pair_logits(siglip_run: tuple[Path, Path]) -> None:
    world, run = siglip_run
    model = load_model(run / "model").eval()
    targets = select_split(load_records(world), "test")[:3]
    outputs = target_outputs(model, targets, bank=[])
    with torch.no_grad():
        for column, record in enumerate(targets):
            image = model.encode_image(model.preprocess(ImageLoader().load(record.image))[None])[0]
            text = model.encode_text(**model.tokenize(record.captions[:1]))[0]
            logit = float(model.logit_scale.exp() * image @ text + model.logit_bias)
            assert outputs["margin"][column] == pytest.approx(logit, rel=1e-5)
            assert outputs["logit"][column] == pytest.approx(logit, rel=1e-5)


def test_a_siglip_preset_run_starts_from_a_new_siglip(tmp_path: Path) -> None:
    world = generate_shapes_world(tmp_path / "world", n_images=12, seed=1, image_size=32)
    model = initial_model(TrainConfig(data=str(world), out=str(tmp_path / "run"), preset="siglip-tiny",
                                      image_size=32, vocab_size=300))
    assert isinstance(model, SigLIPAdapter) and model.objective is SIGMOID
    assert model.context_length == SigLIPAdapter.preset_context_length("siglip-tiny") == 32
    assert model.preprocess.size == 32 and model.logit_bias.item() == -10.0
    with pytest.raises(ValueError, match=r"unknown preset 'siglip-huge'; choose one of \(.*'siglip-tiny'"):
        initial_model(TrainConfig(data=str(world), out=str(tmp_path / "run"), preset="siglip-huge"))


def test_sigmoid_pair_logit_needs_a_logit_bias(tokenizer) -> None:
    assert isinstance(output_for_task("siglip"), SigmoidPairLogit)
    assert isinstance(output_for_objective(SIGMOID), SigmoidPairLogit)
    clip = HFCLIP.from_preset("tiny", tokenizer, image_size=16, vision_num_hidden_layers=1, text_num_hidden_layers=1)
    images, tokens = torch.zeros(2, 3, 16, 16), clip.tokenize(CAPTIONS[:2])
    with pytest.raises(ValueError, match="HFCLIP has no logit bias.*use ClipMargin"):
        SigmoidPairLogit().loss_weight(clip, (images, tokens), torch.arange(2))
