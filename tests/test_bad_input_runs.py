"""Bad models, stores and runs: each is refused with a message naming what is wrong, and earlier outputs survive.

The table in docs/bad-input.md points at these tests.
"""

from __future__ import annotations

import errno
import importlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cliptrace.trak.settings import AttributionSettings
from cliptrace.cli import app
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import HFCLIP, load_model, train_tokenizer
from cliptrace.train import TrainConfig, list_checkpoints, train
from cliptrace.train import checkpoint as checkpoint_module
from cliptrace.trak import TRAKer
from cliptrace.trak.attribute import attribute

attribute_module = importlib.import_module("cliptrace.trak.attribute")  # the module, not the function of that name

OPTIONS = ["--proj-dim", "32", "--lambda-reg", "0.1", "--bank-size", "8", "--batch-size", "8", "--no-progress",
           "--top-k", "2"]
FAST = {"settings": AttributionSettings(proj_dim=32, lambda_reg=0.1, bank_size=8, batch_size=8)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad_runs")
    world = generate_shapes_world(root / "world", n_images=40, seed=2, format="csv")
    config = TrainConfig(data=str(world), out=str(root / "run"), preset="tiny", image_size=32, vocab_size=300,
                         epochs=1, batch_size=8, warmup_steps=1, eval_split=None, progress=False)
    train(config)
    return world, root / "run"


def _fails(*args: object) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output


class Classifier(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(1))


def _traker(tmp_path: Path, model: nn.Module, n: int = 8) -> TRAKer:
    return TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=tmp_path, proj_dim=None,
                  device="cpu", logging_level=logging.WARNING)


def _batch(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 2, 3, generator=generator), torch.randint(0, 4, (count,), generator=generator)


# --- training-set size ------------------------------------------------------------------------------------


def test_traker_indices_beyond_the_training_set_size_are_refused(tmp_path: Path) -> None:
    traker = _traker(tmp_path, Classifier())
    traker.load_checkpoint(traker.model.state_dict(), model_id=0)
    with pytest.raises(IndexError, match=r"training indices must lie in \[0, 8\); got 6\.\.9"):
        traker.featurize(_batch(4), inds=[6, 7, 8, 9])
    assert traker.store.missing("0").tolist() == list(range(8))


def test_a_store_of_another_training_set_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    world, run = trained
    store = tmp_path / "store"
    command = ["trak", "featurize", run, world, "--store", store, *OPTIONS[:-2]]
    result = CliRunner().invoke(app, [str(arg) for arg in command])
    assert result.exit_code == 0, result.output
    output = _fails("trak", "score", run, world, "--train-split", "", "--store", store, "--out", tmp_path / "out",
                    *OPTIONS)
    assert f"error: checkpoint 'epoch-0001': feature store {store} was made with other settings" in output
    assert "train_size: 32 -> 40" in " ".join(output.split())
    assert not (tmp_path / "out").exists()


# --- scoring before finalizing ------------------------------------------------------------------------------


def test_scoring_before_finalizing_is_refused(tmp_path: Path) -> None:
    traker = _traker(tmp_path, Classifier())
    traker.load_checkpoint(traker.model.state_dict(), model_id=0)
    traker.featurize(_batch(8), num_samples=8)
    traker.start_scoring_checkpoint("exp", traker.model.state_dict(), model_id=0, num_targets=3)
    with pytest.raises(RuntimeError, match=r"model id '0' is not finalized: call finalize_features\(\) first"):
        traker.score(_batch(3, seed=1), num_samples=3)
    traker.finalize_features()
    with pytest.raises(ValueError, match=r"model id '0' has no kernel or incomplete target features for experiment "
                                         r"'exp'"):
        traker.finalize_scores("exp")
    assert not (tmp_path / "scores" / "exp.npy").exists()


def test_finalizing_before_every_example_is_featurized_is_refused(tmp_path: Path) -> None:
    traker = _traker(tmp_path, Classifier())
    traker.load_checkpoint(traker.model.state_dict(), model_id=0)
    traker.featurize(_batch(5), num_samples=5)
    with pytest.raises(ValueError, match=r"checkpoint '0' in .* is not fully featurized: 3 of 8 examples missing "
                                         r"\(first: \[5, 6, 7\]\)"):
        traker.finalize_features()


# --- a store made with other settings -----------------------------------------------------------------------


def test_a_store_made_with_other_settings_names_each_difference(trained: tuple[Path, Path], tmp_path: Path) -> None:
    world, run = trained
    store = tmp_path / "store"
    result = CliRunner().invoke(app, [str(a) for a in ["trak", "topk", run, world, "--store", store,
                                                       "--out", tmp_path / "first", *OPTIONS]])
    assert result.exit_code == 0, result.output
    output = _fails("trak", "topk", run, world, "--store", store, "--out", tmp_path / "second", "--seed", "1",
                    *OPTIONS)
    assert f"error: checkpoint 'epoch-0001': feature store {store} was made with other settings" in output
    assert "seed: 0 -> 1" in output and "use another store directory, or the original settings" in output
    assert (tmp_path / "first" / "ids.json").is_file() and not (tmp_path / "second").exists()


# --- NaN or infinite features ---------------------------------------------------------------------------------


def test_nan_features_name_the_training_example_and_store_nothing_of_the_batch(tmp_path: Path) -> None:
    traker = _traker(tmp_path, Classifier())
    traker.load_checkpoint(traker.model.state_dict(), model_id=0)
    images, labels = _batch(8)
    traker.featurize((images[:4], labels[:4]), num_samples=4)
    images[5, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"features of example\(s\) \[5\] under checkpoint '0' are NaN or infinite"):
        traker.featurize((images[4:], labels[4:]), inds=[4, 5, 6, 7])
    assert traker.store.missing("0").tolist() == [4, 5, 6, 7]


def test_nan_features_name_the_record_id(trained: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    world, run = trained
    real = attribute_module.record_features

    def overflowing(featurizer, batches, positions, train_index, device):
        features, weights = real(featurizer, batches, positions, train_index, device)
        features[[slot for slot, position in enumerate(positions) if position == 11]] = float("nan")
        return features, weights

    monkeypatch.setattr(attribute_module, "record_features", overflowing)
    records = attribute_module.read_records(world, "train")
    with pytest.raises(ValueError, match=rf"features of example\(s\) \[11\] .* record id\(s\) \['{records[11].id}'\]"):
        attribute(run, world, world, store_dir=tmp_path / "store", checkpoints=1, **FAST)


# --- a checkpoint of another architecture ---------------------------------------------------------------------


def _tokenizer():
    return train_tokenizer(["a red circle", "a small blue square", "two green crosses"] * 5, vocab_size=300,
                           context_length=16)


def test_a_model_directory_with_weights_of_another_architecture_is_refused(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    HFCLIP.from_preset("tiny", tokenizer, image_size=32).save(tmp_path / "tiny")
    HFCLIP.from_preset("small", tokenizer, image_size=32).save(tmp_path / "small")
    shutil.copy(tmp_path / "small" / "model.safetensors", tmp_path / "tiny" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors \(config .*config.json\): weights from another "
                                         r"architecture \(\d+ tensor\(s\) of another shape, 0 missing\): "
                                         r"text_model\.\S+: \[\d+, 256\] in the weights, \[\d+, 128\] in the model"):
        load_model(tmp_path / "tiny")


def test_traker_refuses_a_state_dict_of_another_architecture(tmp_path: Path) -> None:
    traker = _traker(tmp_path, Classifier(width=4))
    with pytest.raises(ValueError, match=r"checkpoint of model id 0: weights from another architecture \(2 tensor\(s\)"
                                         r" of another shape, 0 missing\): net.weight: \[5, 6\] in the weights, "
                                         r"\[4, 6\] in the model"):
        traker.load_checkpoint(Classifier(width=5).state_dict(), model_id=0)
    assert traker.store.checkpoint_ids() == []


def test_an_ensemble_checkpoint_of_another_architecture_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    world, run = trained
    other = tmp_path / "other-run" / "small-0001"
    model = load_model(list_checkpoints(run)[-1])
    HFCLIP.from_preset("small", model.tokenizer, image_size=32).save(other)
    with pytest.raises(ValueError, match=r"checkpoint 'small-0001': feature store .* was made with other "
                                         r"settings:\n  parameters\."):
        attribute(run, world, world, store_dir=tmp_path / "store", checkpoints=[list_checkpoints(run)[-1], other],
                  **FAST)


# --- a full disk ------------------------------------------------------------------------------------------


def _full_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_checkpointing_keeps_earlier_checkpoints_and_resume_completes(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world, _ = trained
    config = TrainConfig(data=str(world), out=str(tmp_path / "run"), preset="tiny", image_size=32, vocab_size=300,
                         epochs=2, batch_size=8, warmup_steps=1, eval_split=None, progress=False)
    real_save, calls = checkpoint_module.write_state, []

    def fill_up_on_second(*args: object, **kwargs: object) -> None:
        calls.append(1)
        (_full_disk if len(calls) == 2 else real_save)(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_state", fill_up_on_second)
    with pytest.raises(OSError, match="epoch-0002: could not write the checkpoint .*No space left on device"):
        train(config)
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["epoch-0001"]
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch-0001"]
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.setattr(checkpoint_module, "write_state", real_save)  # space was freed
    result = train(config, resume=True)
    assert [path.name for path in result.checkpoints] == ["epoch-0001", "epoch-0002"]


def test_a_full_disk_while_saving_attributions_leaves_the_earlier_ones(trained: tuple[Path, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    world, run = trained
    result = attribute(run, world, world, store_dir=tmp_path / "store", checkpoints=1, **FAST)
    out = tmp_path / "out"
    result.save(out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    monkeypatch.setattr(attribute_module.np, "save", _full_disk)
    saved, result.scores = result.scores, result.scores + 1.0
    with pytest.raises(OSError, match="No space left on device"):
        result.save(out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert np.array_equal(np.load(out / "scores.npy"), saved)
