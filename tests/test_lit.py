"""LiT from the CLI: a dual encoder of two local HuggingFace backbones, the image one locked, trained by
``cliptrace train --image-backbone --text-backbone --lock-image``; checkpoints reference the locked backbone instead
of copying it, and loading checks that it did not change."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DistilBertConfig,
    DistilBertModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import FrozenBackboneDualEncoder, load_model, train_tokenizer
from cliptrace.models.tokenizer import load_tokenizer
from cliptrace.models.backbone_reference import BackboneChangedError
from cliptrace.train import TrainConfig, initial_model, list_checkpoints

WIDE = {"COLUMNS": "250"}
IMAGE_SIZE = 32
TRAIN_OPTIONS = ["--epochs", "3", "--batch-size", "8", "--lr", "0.01", "--warmup", "1", "--seed", "1",
                 "--eval-split", "", "--no-progress", "--accelerator", "cpu"]


def run_cli(*args: object) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], env=WIDE)
    return result.exit_code, result.stderr, result.exception


def error_line(*args: object) -> str:
    """The one ``error:`` line of a command that must fail through its own error handling."""
    code, stderr, exception = run_cli(*args)
    assert code == 1 and isinstance(exception, SystemExit), (stderr, exception)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def train_ok(*args: object) -> None:
    code, stderr, exception = run_cli("train", *args)
    assert code == 0, (stderr, exception)


def sha256s(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``path``, keyed by file and name."""
    found = {}
    for file in sorted(path.rglob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            names = list(handle.keys())
            found.update({f"{file.relative_to(path)}:{name}": handle.get_tensor(name) for name in names})
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_world(tmp_path_factory.mktemp("lit_world"), n_images=48, image_size=IMAGE_SIZE, seed=5)


def save_tiny_backbones(root: Path, data: Path) -> dict[str, Path]:
    """A tiny ViT with a ViT-style preprocessor_config.json and a tiny BERT with a BPE tokenizer trained offline on
    the captions of ``data``, saved under ``root``; returns their directories by tower."""
    captions = [caption for record in load_records(data) for caption in record.captions]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = ViTModel(ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32))
        bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                    pad_token_id=0))
    vit.save_pretrained(root / "vit")
    preprocessor_config(root / "vit")
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return {"image": root / "vit", "text": root / "bert"}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory, world: Path) -> dict[str, Path]:
    return save_tiny_backbones(tmp_path_factory.mktemp("lit_backbones"), world)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, world: Path, backbones: dict[str, Path]) -> Path:
    """A LiT run trained by the CLI: image backbone locked, text backbone fine-tuned."""
    out = tmp_path_factory.mktemp("lit_run") / "run"
    before = sha256s(backbones["image"])
    train_ok(world, "--out", out, "--image-backbone", backbones["image"], "--text-backbone", backbones["text"],
             "--lock-image", *TRAIN_OPTIONS)
    assert sha256s(backbones["image"]) == before, "training wrote into the locked backbone's directory"
    return out


def preprocessor_config(directory: Path) -> None:
    """A ViT-style ``preprocessor_config.json`` at IMAGE_SIZE."""
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))


def contrastive_loss_by_hand(model: FrozenBackboneDualEncoder, world: Path) -> float:
    """Symmetric InfoNCE of ``model`` over every training pair (first caption), computed here from the encoders."""
    records = select_split(load_records(world), "train")
    loader = ImageLoader()
    images = torch.stack([model.preprocess(loader.load(record.image)) for record in records])
    tokens = model.tokenize([record.captions[0] for record in records])
    model.eval()
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(**tokens)
        logits = model.logit_scale.exp() * image @ text.T
    labels = torch.arange(len(records))
    return float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)


def embeddings_by_hand(model_dir: Path, vision: torch.nn.Module, text: torch.nn.Module, images: torch.Tensor,
                       tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled backbone states through the heads stored in ``model_dir``, normalized."""
    heads = load_file(model_dir / "heads.safetensors")
    with torch.no_grad():
        pooled_image = vision.eval()(pixel_values=images).last_hidden_state.mean(dim=1)
        state = text.eval()(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled_text = (state * mask).sum(1) / mask.sum(1)
    return (F.normalize(F.linear(pooled_image, heads["visual_projection.weight"]), dim=-1),
            F.normalize(F.linear(pooled_text, heads["text_projection.weight"]), dim=-1))


def assert_embeddings(model: FrozenBackboneDualEncoder, images: torch.Tensor, tokens: dict[str, torch.Tensor],
                      expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(**tokens), expected[1], rtol=0, atol=1e-6)


# --- the CLI run -------------------------------------------------------------------------------------------


def test_the_run_records_its_backbones_and_locks(run: Path, backbones: dict[str, Path]) -> None:
    config = json.loads((run / "config.json").read_text())
    assert config["image_backbone"] == str(backbones["image"].resolve())
    assert config["text_backbone"] == str(backbones["text"].resolve())
    assert (config["lock_image"], config["lock_text"], config["model"]) == (True, False, None)
    model = load_model(run / "model")
    assert isinstance(model, FrozenBackboneDualEncoder)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for name, p in model.text.named_parameters() if not name.startswith("pooler."))


def test_a_config_saved_before_backbones_existed_reads_them_as_none(tmp_path: Path) -> None:
    config = {"data": "data.csv", "out": str(tmp_path), "inputs": {"data": "/d/data.csv", "model": None,
                                                                   "train_ids": None}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert TrainConfig.load_inputs(tmp_path / "config.json") == {
        "data": "/d/data.csv", "model": None, "train_ids": None, "val_data": None, "image_backbone": None,
        "text_backbone": None}
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert (loaded.image_backbone, loaded.text_backbone, loaded.lock_image, loaded.lock_text) == (None, None, False,
                                                                                                  False)


def test_lit_training_lowers_the_contrastive_loss(run: Path, world: Path) -> None:
    start = initial_model(TrainConfig.load(run / "config.json"))
    trained = load_model(run / "model")
    assert contrastive_loss_by_hand(trained, world) < contrastive_loss_by_hand(start, world) - 0.1


def test_the_locked_backbone_is_bit_for_bit_the_one_on_disk(run: Path, backbones: dict[str, Path]) -> None:
    original = ViTModel.from_pretrained(backbones["image"]).state_dict()
    for directory in [run / "model", *list_checkpoints(run)]:
        trained = load_model(directory).vision.state_dict()
        assert trained.keys() == original.keys()
        for name, value in original.items():
            assert torch.equal(trained[name], value), (directory, name)


def test_checkpoints_hold_no_copy_of_the_locked_backbone(run: Path, backbones: dict[str, Path]) -> None:
    backbone = tensors_of(backbones["image"])
    for directory in [run / "model", *list_checkpoints(run)]:
        assert not (directory / "vision").exists()
        stored = tensors_of(directory)
        assert set(stored) >= {"heads.safetensors:visual_projection.weight", "text/model.safetensors:"
                               "embeddings.word_embeddings.weight"}
        for name, tensor in stored.items():  # no stored tensor (training state included) is one of the backbone's
            same = [other for other in backbone.values() if other.shape == tensor.shape and torch.equal(other, tensor)]
            assert not same, name


def test_the_manifest_records_the_backbones_path_and_file_digests(run: Path, backbones: dict[str, Path]) -> None:
    towers = json.loads((run / "model" / "cliptrace_model.json").read_text())["towers"]
    assert towers["text"] == {"locked": False}
    assert towers["image"] == {"locked": True, "backbone": {
        "path": str(backbones["image"].resolve()),
        "sha256": {name: digest for name, digest in sha256s(backbones["image"]).items()
                   if name in ("config.json", "model.safetensors")}}}


def test_a_checkpoint_loads_to_the_trained_models_exact_outputs(run: Path, backbones: dict[str, Path]) -> None:
    last = list_checkpoints(run)[-1]
    images = pixels()
    for directory in (run / "model", last):
        model = load_model(directory).eval()
        tokens = model.tokenize(["a red circle", "a small blue square above a green triangle"])
        assert_embeddings(model, images, tokens, embeddings_by_hand(
            directory, ViTModel.from_pretrained(backbones["image"]), BertModel.from_pretrained(directory / "text"),
            images, tokens))
    final, checkpoint = load_model(run / "model").state_dict(), load_model(last).state_dict()
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)


def test_the_fine_tuned_text_tower_is_stored_and_reloads_exactly(run: Path, backbones: dict[str, Path]) -> None:
    stored = load_file(run / "model" / "text" / "model.safetensors")
    loaded = load_model(run / "model").text.state_dict()
    assert stored.keys() == loaded.keys()
    assert all(torch.equal(stored[name], loaded[name]) for name in stored)
    original = load_file(backbones["text"] / "model.safetensors")
    assert not torch.equal(stored["embeddings.word_embeddings.weight"], original["embeddings.word_embeddings.weight"])


def test_resuming_a_lit_run_reproduces_it_exactly(run: Path, world: Path, backbones: dict[str, Path],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A crash during epoch 2: only the epoch-1 checkpoint survives; resuming with the same command must reproduce it.
    cut = Path(shutil.copytree(run, tmp_path / "cut"))
    for path in [*list_checkpoints(cut)[1:], cut / "model"]:
        shutil.rmtree(path)
    monkeypatch.chdir(backbones["image"].parent)  # the same backbones, spelled relative to another directory
    train_ok(world, "--out", cut, "--resume", "--image-backbone", backbones["image"].name, "--text-backbone",
             backbones["text"].name, "--lock-image", *TRAIN_OPTIONS)
    want, got = load_model(run / "model").state_dict(), load_model(cut / "model").state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert (run / "train.csv").read_text() == (cut / "train.csv").read_text()


def test_eval_reads_the_lit_run(run: Path, world: Path) -> None:
    code, stderr, exception = run_cli("eval", run, world, "--split", "", "--no-progress")
    assert code == 0, (stderr, exception)


# --- a changed or missing locked backbone ------------------------------------------------------------------


@pytest.fixture
def moved_run(backbones: dict[str, Path], world: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A one-epoch LiT run whose locked image backbone is a copy the test may damage."""
    backbone = Path(shutil.copytree(backbones["image"], tmp_path / "vit"))
    out = tmp_path / "run"
    train_ok(world, "--out", out, "--image-backbone", backbone, "--text-backbone", backbones["text"], "--lock-image",
             *TRAIN_OPTIONS[2:], "--epochs", "1")
    return out, backbone


def test_a_changed_backbone_file_fails_loading_naming_it_and_the_checkpoint(moved_run: tuple[Path, Path],
                                                                           world: Path) -> None:
    out, backbone = moved_run
    weights = load_file(backbone / "model.safetensors")
    weights["embeddings.cls_token"] = weights["embeddings.cls_token"] + 1e-3
    save_file(weights, backbone / "model.safetensors", metadata={"format": "pt"})
    checkpoint = list_checkpoints(out)[-1]
    with pytest.raises(BackboneChangedError) as caught:
        load_model(checkpoint)
    assert str(caught.value) == (
        f"{checkpoint}: its locked image backbone {backbone.resolve()} changed since it was saved (model.safetensors: "
        "sha256 differs); restore the backbone it was trained with, or train again from the changed one")
    line = error_line("eval", out, world, "--no-progress")
    assert line.startswith(f"error: {out / 'model'}: its locked image backbone {backbone.resolve()} changed")


def test_resuming_with_a_missing_backbone_is_one_error_naming_it(moved_run: tuple[Path, Path], world: Path,
                                                                 backbones: dict[str, Path]) -> None:
    out, backbone = moved_run
    shutil.rmtree(backbone)
    backbone.mkdir()  # present again, but empty: the run must not start over from nothing
    line = error_line("train", world, "--out", out, "--resume", "--image-backbone", backbone, "--text-backbone",
                      backbones["text"], "--lock-image", *TRAIN_OPTIONS)
    checkpoint = list_checkpoints(out)[-1]
    assert line == (f"error: {checkpoint}: its locked image backbone {backbone.resolve()} is missing (config.json not "
                    "found); the model directory holds no copy of it: restore the backbone there")


@pytest.mark.parametrize("towers, message", [
    ({"image": {"locked": "yes"}, "text": {"locked": False}}, "key 'towers' must map 'image' and 'text'"),
    ({"image": {"locked": True, "backbone": {"path": "vit", "sha256": {"config.json": "0"}}},
      "text": {"locked": False}}, "a backbone reference needs an absolute 'path'"),
    ({"image": {"locked": False, "backbone": {"path": "/vit", "sha256": {"config.json": "0"}}},
      "text": {"locked": False}}, "the image tower is not locked, so its backbone must be stored"),
])
def test_a_malformed_towers_entry_is_named(run: Path, tmp_path: Path, towers: dict, message: str) -> None:
    model_dir = Path(shutil.copytree(run / "model", tmp_path / "model"))
    manifest = json.loads((model_dir / "cliptrace_model.json").read_text())
    (model_dir / "cliptrace_model.json").write_text(json.dumps({**manifest, "towers": towers}))
    with pytest.raises(ValueError) as caught:
        load_model(model_dir)
    assert str(caught.value).startswith(f"{model_dir / 'cliptrace_model.json'}: {message}")


# --- bad combinations of options ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--lock-image"], "error: lock_image needs image_backbone (--lock-image needs --image-backbone)"),
    (["--image-backbone", "{image}"], "error: image_backbone and text_backbone go together"),
    (["--image-backbone", "{image}", "--text-backbone", "{text}", "--model", "{image}"],
     "error: model and the backbones exclude each other"),
    (["--image-backbone", "{image}", "--text-backbone", "{text}", "--preset", "tiny"],
     "error: --preset set up a new preset model: they do not go with --image-backbone"),
    (["--image-backbone", "{image}", "--text-backbone", "{text}", "--image-size", "64"],
     "error: image_size does not apply to backbones"),
])
def test_incompatible_model_options_are_one_line_errors(world: Path, backbones: dict[str, Path], tmp_path: Path,
                                                        extra: list[str], message: str) -> None:
    args = [arg.format(image=backbones["image"], text=backbones["text"]) for arg in extra]
    line = error_line("train", world, "--out", tmp_path / "run", *args, *TRAIN_OPTIONS)
    assert line.startswith(message)
    assert not (tmp_path / "run").exists()


# --- the Python API: save and load --------------------------------------------------------------------------


def take_a_step(model: FrozenBackboneDualEncoder) -> dict[str, torch.Tensor]:
    """One SGD step of the contrastive loss on three pairs, so that the trainable weights leave their start."""
    tokens = model.tokenize(["a red circle", "a blue square", "a green triangle"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    image, text, scale = model(pixels(), tokens["input_ids"], tokens["attention_mask"])
    F.cross_entropy(scale * image @ text.T, torch.arange(3)).backward()
    optimizer.step()
    return tokens


def assert_reloads_exactly(model: FrozenBackboneDualEncoder, directory: Path, tokens: dict[str, torch.Tensor]
                           ) -> FrozenBackboneDualEncoder:
    """``directory`` (where ``model`` was saved) loads to the same weights and, in eval mode, the same outputs."""
    loaded = load_model(directory)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels()), loaded.encode_image(pixels()))
        assert torch.equal(model.encode_text(**tokens), loaded.encode_text(**tokens))
    return loaded


def test_save_load_of_a_locked_model_is_bit_exact_after_a_step(backbones: dict[str, Path], tmp_path: Path) -> None:
    model = FrozenBackboneDualEncoder.from_pretrained(backbones["image"], backbones["text"], projection_dim=8,
                                                      lock_image=True, lock_text=True, seed=0)
    tokens = take_a_step(model)
    model.save(tmp_path / "saved")
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == ["cliptrace_model.json",
                                                                            "heads.safetensors", "text"]
    assert not list((tmp_path / "saved" / "text").glob("*.safetensors"))
    assert assert_reloads_exactly(model, tmp_path / "saved", tokens).locked == {"image": True, "text": True}


def test_weights_a_locked_backbone_lacks_are_the_same_on_every_load(backbones: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    text = Path(shutil.copytree(backbones["text"], tmp_path / "text"))
    weights = load_file(text / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if not name.startswith("pooler.")}
    assert len(kept) < len(weights)  # the pooler is left out, so loading initializes it
    save_file(kept, text / "model.safetensors", metadata={"format": "pt"})
    model = FrozenBackboneDualEncoder.from_pretrained(backbones["image"], text, projection_dim=8, lock_text=True)
    model.save(tmp_path / "saved")
    assert any(name.startswith("text.pooler.") for name in model.state_dict())
    torch.manual_seed(123)  # another global random state: the missing weights must not depend on it
    assert_reloads_exactly(model, tmp_path / "saved", model.tokenize(["a red circle"]))


OTHER_BACKBONES = {  # name -> (image backbone, text backbone of a vocabulary size, lock_image, lock_text)
    "resnet-distilbert": (
        lambda: ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
        lambda vocab: DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                                       max_position_embeddings=32, pad_token_id=0)),
        True, False),
    "clip-towers": (
        lambda: CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=16,
                                                 intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
        lambda vocab: CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   max_position_embeddings=32, eos_token_id=1)),
        False, True),
}


@pytest.mark.parametrize("name", OTHER_BACKBONES)
def test_other_backbone_families_save_the_unlocked_tower_and_reload_exactly(
        backbones: dict[str, Path], tmp_path: Path, name: str) -> None:
    make_image, make_text, lock_image, lock_text = OTHER_BACKBONES[name]
    tokenizer_files = [backbones["text"] / file for file in ("tokenizer.json", "tokenizer_config.json")]
    torch.manual_seed(0)
    make_image().save_pretrained(tmp_path / "image")
    preprocessor_config(tmp_path / "image")
    vocab = len(json.loads(tokenizer_files[0].read_text())["model"]["vocab"])
    make_text(vocab).save_pretrained(tmp_path / "text")
    for path in tokenizer_files:
        shutil.copy(path, tmp_path / "text" / path.name)
    model = FrozenBackboneDualEncoder.from_pretrained(tmp_path / "image", tmp_path / "text", projection_dim=8, seed=0,
                                                      lock_image=lock_image, lock_text=lock_text)
    tokens = take_a_step(model)
    model.save(tmp_path / "saved")
    stored = {tower for tower, directory in (("image", "vision"), ("text", "text"))
              if list((tmp_path / "saved" / directory).glob("*.safetensors"))}
    assert stored == {tower for tower, locked in (("image", lock_image), ("text", lock_text)) if not locked}
    loaded = assert_reloads_exactly(model, tmp_path / "saved", tokens)
    assert loaded.locked == {"image": lock_image, "text": lock_text}


UNLOCKED_CONFIGS = {  # name -> (image backbone config, text backbone config of a vocabulary size)
    "vit-bert": (lambda: ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32),
                 lambda vocab: BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=32, pad_token_id=0)),
    "clip-towers": (lambda: CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2),
                    lambda vocab: CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=32, eos_token_id=1)),
}


@pytest.mark.parametrize("name", UNLOCKED_CONFIGS)
def test_every_trainable_parameter_of_unlocked_backbones_reaches_the_loss(backbones: dict[str, Path],
                                                                          name: str) -> None:
    """The pooler (BERT, ViT) and CLIP's vision post_layernorm act only on the backbone's own pooled output, which
    the mean pooling never reads: they are frozen, so no trainable parameter is left without a gradient (TRAK's
    per-layer kernels and EK-FAC failed on them, DDP refuses them)."""
    tokenizer = load_tokenizer(backbones["text"])
    image_config, text_config = UNLOCKED_CONFIGS[name]
    model = FrozenBackboneDualEncoder.from_configs(image_config(), text_config(len(tokenizer)), tokenizer,
                                                   projection_dim=8, seed=0, lock_image=False, lock_text=False)
    take_a_step(model)
    without_gradient = [key for key, parameter in model.named_parameters()
                        if parameter.requires_grad and (parameter.grad is None or not parameter.grad.abs().sum() > 0)]
    assert without_gradient == []
    frozen = sorted(key for key, parameter in model.named_parameters() if not parameter.requires_grad)
    assert frozen == sorted(key for key in model.state_dict()
                            if key.startswith(("vision.pooler.", "text.pooler.", "vision.post_layernorm.")))
    assert frozen  # each pair has such a module


def test_an_old_style_frozen_directory_with_stored_backbones_still_loads(backbones: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """The layout of cliptrace before backbones could be referenced: both stored, no ``towers`` in the manifest."""
    directory = tmp_path / "old"
    vision, text = ViTModel.from_pretrained(backbones["image"]), BertModel.from_pretrained(backbones["text"])
    vision.save_pretrained(directory / "vision")
    text.save_pretrained(directory / "text")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(backbones["text"] / name, directory / "text" / name)
    generator = torch.Generator().manual_seed(3)
    save_file({"visual_projection.weight": torch.randn(8, 24, generator=generator),
               "text_projection.weight": torch.randn(8, 16, generator=generator),
               "log_scale": torch.tensor(2.5)}, directory / "heads.safetensors")
    (directory / "cliptrace_model.json").write_text(json.dumps({
        "format_version": 1, "adapter": "frozen_dual_encoder", "context_length": 16, "projection_dim": 8,
        "preprocess": {"size": IMAGE_SIZE, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    model = load_model(directory).eval()
    assert model.locked == {"image": True, "text": True} and model.references == {}
    tokens = model.tokenize(["a red circle", "a blue square"])
    assert_embeddings(model, pixels(), tokens, embeddings_by_hand(directory, vision, text, pixels(), tokens))
    model.save(tmp_path / "again")  # no reference to keep: saved in full again
    assert (tmp_path / "again" / "vision" / "model.safetensors").is_file()
