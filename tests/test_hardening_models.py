"""Damaged model directories and failing explanation methods: a one-line error naming the file, never silent garbage.

Each model directory is a tiny model saved once per module and copied before a test damages it.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import BertConfig, ResNetConfig
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.cli.errors import reported_errors
from cliptrace.data.transforms import ImageTransform
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.explain.api import MethodFailed, explain
from cliptrace.explain.base import AttributionMethod
from cliptrace.explain.baselines import Occlusion
from cliptrace.models import HFCLIP, FrozenBackboneDualEncoder, load_model, train_tokenizer

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a yellow star below a circle"]
WIDE = {"COLUMNS": "250"}
MARKER_CODE = "open({marker!r}, 'w').close()"


class CodeRunningPickle:
    """Unpickles by running ``code``: what a crafted ``pytorch_model.bin`` does under ``torch.load``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple:
        return exec, (self.code,)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 3, vocab_size=280, context_length=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    """A tiny HF CLIP and a tiny frozen-backbone model (a ResNet image backbone, which no tower describes) saved as
    model directories, and a 32-pixel image."""
    root = tmp_path_factory.mktemp("models")
    clip = HFCLIP.from_preset("tiny", tokenizer, seed=0, image_size=32, vision_num_hidden_layers=1,
                              text_num_hidden_layers=1)
    clip.save(root / "clip")
    vision = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16)
    FrozenBackboneDualEncoder.from_configs(vision, text, tokenizer, preprocess=ImageTransform(16), projection_dim=8,
                                           seed=0).save(root / "frozen")
    Image.new("RGB", (40, 30), (220, 30, 30)).save(root / "red.png")
    return {"clip": root / "clip", "frozen": root / "frozen", "image": root / "red.png"}


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_cli(*args: object) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], env=WIDE)
    return result.exit_code, result.stderr, result.exception


def assert_one_line_error(args: list[object], starts: str) -> str:
    """The command exits 1 through its own error handling with one ``error:`` line that starts as given."""
    code, stderr, exception = run_cli(*args)
    assert code == 1 and isinstance(exception, SystemExit), (stderr, exception)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {starts}"), stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- item 4: a model directory without tokenizer files -----------------------------------------------------


def test_a_clip_directory_without_tokenizer_files_is_refused_naming_it(saved, tmp_path) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    with pytest.raises(ValueError, match=rf"^{model_dir}: no tokenizer files \(tokenizer\.json, or vocab\.json and "
                                         r"merges\.txt, or vocab\.txt, .*\): .*only 2 special tokens"):
        load_model(model_dir)
    assert_one_line_error(["explain", "--model", model_dir, "--image", saved["image"], "--text", "a red circle",
                           "--method", "gradient", "--out", tmp_path / "x.png"], f"{model_dir}: no tokenizer files")
    assert not (tmp_path / "x.png").exists()


def test_a_frozen_directory_without_tokenizer_files_is_refused_naming_it(saved, tmp_path) -> None:
    model_dir = copy_of(saved["frozen"], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / "text" / name).unlink()
    with pytest.raises(ValueError, match=rf"^{model_dir / 'text'}: no tokenizer files .* special tokens"):
        load_model(model_dir)


def test_a_tokenizer_holding_only_special_tokens_is_refused(saved, tmp_path) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    path = model_dir / "tokenizer.json"
    backend = json.loads(path.read_text(encoding="utf-8"))
    backend["model"]["vocab"], backend["model"]["merges"] = {}, []
    path.write_text(json.dumps(backend), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{model_dir}: its tokenizer files \(tokenizer\.json\) hold only 3 "
                                         "special tokens"):
        load_model(model_dir)


def test_a_tokenizer_of_another_model_is_refused(saved, tmp_path, tokenizer) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    rows = json.loads((model_dir / "config.json").read_text())["text_config"]["vocab_size"]
    bigger = train_tokenizer(CAPTIONS * 3, vocab_size=280, context_length=16)
    bigger.add_tokens([f"extra{i}" for i in range(rows + 5 - len(bigger))])
    bigger.save_pretrained(model_dir)
    assert len(bigger) == rows + 5
    with pytest.raises(ValueError, match=rf"^{model_dir}: the tokenizer has token id {rows + 4}, but the text tower "
                                         rf"embeds only {rows} ids"):
        load_model(model_dir)


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("tokenizer.json", "garbage{", r"tokenizer\.json: not valid JSON \(line 1\)"),
        ("tokenizer.json", "cut", r"tokenizer\.json: not valid JSON \(line \d+\)"),
        ("tokenizer.json", "{}", r"tokenizer\.json: not a tokenizer file \("),
        ("tokenizer_config.json", "{bad", r"tokenizer_config\.json: not valid JSON \(line 1\)"),
    ],
)
def test_damaged_tokenizer_files_are_named(saved, tmp_path, name: str, damage: str, message: str) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    if damage == "cut":
        cut_in_half(model_dir / name)
    else:
        (model_dir / name).write_text(damage, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{model_dir}/{message}"):
        load_model(model_dir)


# --- item 5: damaged or pickled weights ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_model_safetensors_is_one_error_naming_the_file(saved, tmp_path, damage: str) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    weights = model_dir / "model.safetensors"
    if damage == "truncated":
        cut_in_half(weights)
    else:
        weights.write_bytes(b"" if damage == "empty" else b"\x13not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match=rf"^{weights}: not a readable safetensors file \(truncated or corrupt: "):
        load_model(model_dir)
    assert_one_line_error(["explain", "--model", model_dir, "--image", saved["image"], "--text", "a",
                           "--method", "gradient", "--out", tmp_path / "x.png"],
                          f"{weights}: not a readable safetensors file")


@pytest.mark.parametrize("file", ["heads.safetensors", "vision/model.safetensors", "text/model.safetensors"])
def test_damaged_weights_of_a_frozen_model_are_named(saved, tmp_path, file: str) -> None:
    model_dir = copy_of(saved["frozen"], tmp_path)
    cut_in_half(model_dir / file)
    with pytest.raises(ValueError, match=rf"^{model_dir / file}: not a readable safetensors file"):
        load_model(model_dir)


def test_frozen_heads_that_do_not_fit_the_manifest_are_named(saved, tmp_path) -> None:
    model_dir = copy_of(saved["frozen"], tmp_path)
    heads = load_file(model_dir / "heads.safetensors")
    assert heads["visual_projection.weight"].shape == (8, 16)
    save_file({**heads, "visual_projection.weight": torch.zeros(4, 16)}, model_dir / "heads.safetensors")
    with pytest.raises(ValueError, match=rf"^{model_dir / 'heads.safetensors'} .*weights from another architecture "
                                         r".*visual_projection\.weight: \[4, 16\] in the weights, \[8, 16\]"):
        load_model(model_dir)


def write_code_running_pickle(path: Path, marker: Path) -> None:
    """A pickle that creates ``marker`` when unpickled; checked to do so, then the marker is removed."""
    data = pickle.dumps({"weights": CodeRunningPickle(MARKER_CODE.format(marker=str(marker)))})
    pickle.loads(data)  # the file is really dangerous: unpickling it runs its code
    assert marker.exists()
    marker.unlink()
    path.write_bytes(data)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches torch.load or pickle while loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("adapter, weights", [("clip", "model.safetensors"), ("frozen", "vision/model.safetensors")])
def test_pickled_weights_are_refused_and_never_unpickled(saved, tmp_path, adapter: str, weights: str,
                                                         request: pytest.FixtureRequest) -> None:
    model_dir = copy_of(saved[adapter], tmp_path)
    (model_dir / weights).unlink()
    pickled, marker = (model_dir / weights).with_name("pytorch_model.bin"), tmp_path / "code-ran"
    write_code_running_pickle(pickled, marker)
    request.getfixturevalue("no_unpickling")
    with pytest.raises(ValueError, match=rf"^{pickled}: pickled weights are not loaded \(unpickling can run code "
                                         r"the file carries\); to convert them, load the model yourself where you "
                                         r"trust the file .* save_pretrained"):
        load_model(model_dir)
    assert not marker.exists()


def test_a_config_naming_pickled_weights_is_refused_though_safetensors_exist(saved, tmp_path, no_unpickling) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    marker = tmp_path / "code-ran"
    (model_dir / "adapter_model.bin").write_bytes(
        pickle.dumps(CodeRunningPickle(MARKER_CODE.format(marker=str(marker)))))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(ValueError, match=rf"^{model_dir / 'config.json'}: key 'transformers_weights' names "
                                         r"'adapter_model\.bin', not a safetensors file; pickled weights are not"):
        load_model(model_dir)
    assert not marker.exists()


def test_sharded_safetensors_load_and_a_missing_shard_is_named(saved, tmp_path) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    (model_dir / "model.safetensors").unlink()
    original = load_model(saved["clip"])
    original.model.save_pretrained(model_dir, max_shard_size="100KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    loaded = load_model(model_dir)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    (model_dir / shards[-1]).unlink()
    with pytest.raises(ValueError, match=rf"^{model_dir / 'model.safetensors.index.json'}: shard {shards[-1]} is "
                                         "missing"):
        load_model(model_dir)


def test_a_directory_without_weights_says_so(saved, tmp_path) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=rf"^{model_dir}: no weights \(model\.safetensors, or "):
        load_model(model_dir)


# --- item 11 and the manifest's other fields ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", 1.0, True, 0, None])
def test_a_format_version_that_is_no_positive_integer_is_not_called_newer(saved, tmp_path, version) -> None:
    model_dir = copy_of(saved["clip"], tmp_path)
    manifest = json.loads((model_dir / "cliptrace_model.json").read_text())
    (model_dir / "cliptrace_model.json").write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(ValueError) as caught:
        load_model(model_dir)
    assert str(caught.value) == (f"{model_dir / 'cliptrace_model.json'}: key 'format_version' must be a positive "
                                 f"integer (got {version!r})")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"projection_dim": None}, "missing key 'projection_dim'"),
        ({"projection_dim": "8"}, r"key 'projection_dim' must be a positive integer \(got '8'\)"),
        ({"context_length": 0}, r"key 'context_length' must be a positive integer \(got 0\)"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_named(saved, tmp_path, fields: dict, message: str) -> None:
    model_dir = copy_of(saved["frozen"], tmp_path)
    manifest = json.loads((model_dir / "cliptrace_model.json").read_text())
    manifest = {key: value for key, value in {**manifest, **fields}.items() if value is not None}
    (model_dir / "cliptrace_model.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{model_dir / 'cliptrace_model.json'}: {message}$"):
        load_model(model_dir)


# --- item 5: a failing explanation method ---------------------------------------------------------------------


class Broken(AttributionMethod):
    name = "broken"
    image_level = "patch"

    def attribute_image(self, model, pixel_values, text_side):
        raise RuntimeError("expected all tensors to be on the same device\n(a second line of detail)")


def test_a_failing_method_raises_method_failed_naming_it_with_the_cause(saved) -> None:
    model = load_model(saved["clip"]).eval()
    pixels = torch.zeros(1, 3, 32, 32)
    with pytest.raises(MethodFailed) as caught:
        explain(model, pixels, "a red circle", method=Broken())
    failure = caught.value
    assert failure.method == "broken"
    assert failure.problem == "RuntimeError: expected all tensors to be on the same device"
    assert str(failure) == "method 'broken' failed: RuntimeError: expected all tensors to be on the same device"
    assert isinstance(failure.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="either text"):  # a bad target is the caller's error, not the method's
        explain(model, pixels, method=Broken())


def break_occlusion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self, model, pixel_values, text_side):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(Occlusion, "attribute_image", fail)


def test_explain_writes_the_other_methods_names_the_failed_one_and_exits_1(saved, tmp_path, monkeypatch) -> None:
    break_occlusion(monkeypatch)
    out = tmp_path / "grid.png"
    code, stderr, exception = run_cli("explain", "--model", saved["clip"], "--image", saved["image"], "--text",
                                      "a red circle", "--method", "gradient,occlusion,random", "--out", out)
    assert code == 1 and isinstance(exception, SystemExit), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {saved['clip']}, method occlusion: RuntimeError: CUDA out of memory. "
                      "Tried to allocate 2.00 GiB"]
    assert "1 of 3 methods failed (occlusion); the others were written" in stderr
    with Image.open(out) as grid:  # two method columns where three would be wider
        two_wide = grid.width
    run_cli("explain", "--model", saved["clip"], "--image", saved["image"], "--text", "a red circle",
            "--method", "gradient,random", "--out", tmp_path / "two.png")
    with Image.open(tmp_path / "two.png") as reference:
        assert reference.width == two_wide


def test_explain_of_a_frozen_model_names_the_methods_that_need_a_described_tower(saved, tmp_path) -> None:
    out = tmp_path / "grid.png"
    code, stderr, exception = run_cli("explain", "--model", saved["frozen"], "--image", saved["image"], "--text",
                                      "a red circle", "--method", "decomposition,gradient", "--out", out)
    assert code == 1 and isinstance(exception, SystemExit), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {saved['frozen']}, method decomposition: TowerUnavailable: the exact decomposition: "
                      "FrozenBackboneDualEncoder cannot describe its image tower: its backbone is a ResNetModel, "
                      "which is not described (supported: ViTModel, CLIPVisionModel)"]
    assert out.is_file()


def test_explain_with_every_method_failing_writes_nothing(saved, tmp_path) -> None:
    out = tmp_path / "grid.png"
    code, stderr, exception = run_cli("explain", "--model", saved["frozen"], "--image", saved["image"], "--text",
                                      "a", "--method", "decomposition,chefer", "--out", out)
    assert code == 1 and isinstance(exception, SystemExit), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert [line.split(":")[1] for line in errors] == [f" {saved['frozen']}, method decomposition",
                                                       f" {saved['frozen']}, method chefer",
                                                       f" {saved['frozen']}"]
    assert errors[-1] == f"error: {saved['frozen']}: every method failed (decomposition, chefer); nothing written " \
                         f"to {out}"
    assert not out.exists()


def test_batch_explain_keeps_the_rows_of_the_methods_that_work(saved, tmp_path, monkeypatch) -> None:
    world = generate_shapes_world(tmp_path / "world", n_images=12, seed=1, image_size=32)
    break_occlusion(monkeypatch)
    out = tmp_path / "batch"
    code, stderr, exception = run_cli("explain", "--model", saved["clip"], "--data", world.parent, "--split", "",
                                      "--limit", 3, "--steps", 3, "--method", "gradient,occlusion", "--out", out,
                                      "--no-progress")
    assert code == 1 and isinstance(exception, SystemExit), stderr
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {saved['clip']}, method occlusion: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    with (out / "metrics.csv").open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [row["method"] for row in rows] == ["gradient"] * 3


def test_reported_errors_turns_a_failed_method_into_one_line(capsys) -> None:
    with pytest.raises(typer.Exit) as caught, reported_errors():
        raise MethodFailed("chefer", RuntimeError("no attentions\ndetail"))
    assert caught.value.exit_code == 1
    assert capsys.readouterr().err == "error: method chefer: RuntimeError: no attentions\n"
    with pytest.raises(RuntimeError, match="other"), reported_errors():
        raise RuntimeError("other")
