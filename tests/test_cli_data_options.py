"""One set of data options on every command, train --val-data, the eval-split rules and open_clip's flag names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cliptrace.train
from cliptrace.cli import app
from cliptrace.data.images import ImageLoader
from cliptrace.data.options import DataOptions
from cliptrace.data.readers import load_records
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.evaluate import evaluate
from cliptrace.models import load_model
from cliptrace.train import TrainConfig, list_checkpoints

FAST = ["--image-size", "32", "--vocab-size", "300", "--epochs", "1", "--batch-size", "8", "--warmup", "1",
        "--no-progress"]


def _invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


def _tab_file(path: Path, rows: list[dict[str, str]]) -> Path:
    """An open_clip-style tab-separated ``.csv``: ``filepath<TAB>title``, no split column."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows([row["filepath"], row["title"]] for row in rows)
    return path


@pytest.fixture(scope="module")
def tab_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, int]:
    """A shapes world rewritten as two tab-separated open_clip .csv files: train.csv and val.csv (images beside).

    Returns the two files and how many distinct images each holds.
    """
    root = tmp_path_factory.mktemp("tab_world")
    captions = generate_shapes_world(root, n_images=40, seed=2)
    with captions.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    train_rows = [row for row in rows if row["split"] == "train"]
    val_rows = [row for row in rows if row["split"] != "train"]
    return (_tab_file(root / "train.csv", train_rows), _tab_file(root / "val.csv", val_rows),
            len({row["filepath"] for row in train_rows}), len({row["filepath"] for row in val_rows}))


@pytest.fixture(scope="module")
def tab_run(tab_world: tuple[Path, Path, int, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch run on the tab-separated train.csv, evaluated on val.csv through --val-data."""
    train_file, val_file, _, _ = tab_world
    run = tmp_path_factory.mktemp("tab_run") / "run"
    code, out, err = _invoke("train", train_file, "--out", run, "--sep", "tab", "--val-data", val_file, *FAST)
    assert code == 0, out + err
    return run


def test_tab_csv_trains_and_evaluates_on_val_data(tab_world: tuple[Path, Path, int, int], tab_run: Path) -> None:
    train_file, val_file, _, n_val = tab_world
    # The eval set is every record of val.csv (it has no split column: all are "train" there), computed apart.
    val_records = load_records(val_file, sep="\t")
    assert len(val_records) == n_val
    expected = evaluate(load_model(tab_run / "model"), val_records, ImageLoader())
    metrics = json.loads((tab_run / "metrics.json").read_text())
    assert metrics["i2t_R@1"] == pytest.approx(expected["i2t_R@1"])
    assert metrics["t2i_R@1"] == pytest.approx(expected["t2i_R@1"])
    stored = json.loads((tab_run / "config.json").read_text())
    assert stored["data_options"]["sep"] == "\t" and stored["val_data"] == str(val_file.resolve())

    code, out, err = _invoke("eval", tab_run, val_file, "--sep", "\\t", "--split", "", "--no-progress",
                             "--out", tab_run.parent / "eval.json")
    assert code == 0, out + err
    again = json.loads((tab_run.parent / "eval.json").read_text())
    assert again["i2t_R@1"] == pytest.approx(expected["i2t_R@1"])


def test_without_the_separator_the_tab_csv_is_refused(tab_world: tuple[Path, Path, int, int], tmp_path: Path) -> None:
    train_file, _, _, _ = tab_world
    code, _, err = _invoke("train", train_file, "--out", tmp_path / "run", *FAST)
    assert code == 1 and err.startswith(f"error: {train_file}") and "separator" in err


def test_default_val_split_missing_says_so_once(tab_world: tuple[Path, Path, int, int], tmp_path: Path) -> None:
    train_file, _, _, _ = tab_world
    code, out, err = _invoke("train", train_file, "--out", tmp_path / "run", "--sep", "tab", *FAST)
    assert code == 0, out + err
    notes = [line for line in err.splitlines() if "eval split 'val'" in line]
    assert len(notes) == 1 and notes[0].startswith(f"warning: {train_file}") and "without evaluation" in notes[0]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {}


def test_requested_empty_eval_split_is_an_error(tab_world: tuple[Path, Path, int, int], tmp_path: Path) -> None:
    train_file, val_file, n_train, _ = tab_world
    code, _, err = _invoke("train", train_file, "--out", tmp_path / "a", "--sep", "tab", "--eval-split", "val", *FAST)
    assert code == 1
    assert err.strip() == (f"error: {train_file}: no records in eval split 'val'; its splits: 'train' ({n_train}) "
                           "(choose one with --eval-split, or --eval-split '' to train without evaluation)")
    assert not (tmp_path / "a").exists()
    code, _, err = _invoke("train", train_file, "--out", tmp_path / "b", "--sep", "tab", "--val-data", val_file,
                           "--eval-split", "test", *FAST)
    assert code == 1 and err.startswith(f"error: {val_file}: no records in eval split 'test'; its splits: 'train'")


def test_open_clip_flag_names_give_the_same_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[TrainConfig] = []

    def capture(config: TrainConfig, resume: bool = False) -> None:
        seen.append(config)
        raise ValueError("captured")

    monkeypatch.setattr(cliptrace.train, "train", capture)
    common = ["train", tmp_path / "data.csv", "--out", tmp_path / "run"]
    _invoke(*common, "--wd", "0.3", "--warmup", "7", "--workers", "2", "--save-frequency", "3")
    _invoke(*common, "--weight-decay", "0.3", "--warmup-steps", "7", "--num-workers", "2", "--save-every", "3")
    assert len(seen) == 2 and seen[0] == seen[1]
    assert (seen[0].weight_decay, seen[0].warmup_steps, seen[0].num_workers, seen[0].save_every) == (0.3, 7, 2, 3)


def test_resume_and_trak_reuse_the_stored_data_options(tab_world: tuple[Path, Path, int, int], tmp_path: Path
                                                       ) -> None:
    train_file, val_file, n_train, _ = tab_world
    run = tmp_path / "run"
    code, out, err = _invoke("train", train_file, "--out", run, "--sep", "tab", "--eval-split", "", *FAST)
    assert code == 0, out + err
    # Resumed without --sep: the run's own options read the data.
    code, out, err = _invoke("train", train_file, "--out", run, "--resume", "--eval-split", "", *FAST[:4],
                             "--epochs", "2", *FAST[6:])
    assert code == 0, out + err
    assert [path.name for path in list_checkpoints(run)] == ["epoch-0001", "epoch-0002"]
    # Other options than the run's are refused.
    code, _, err = _invoke("train", train_file, "--out", run, "--resume", "--sep", ";", "--eval-split", "", *FAST)
    assert code == 1 and "data_options" in err and "cannot resume" in err

    # trak on RUN alone: the run's data, read with its options.
    store = tmp_path / "store"
    code, out, err = _invoke("trak", "featurize", run, "--store", store, "--checkpoint", "epoch-0002",
                             "--proj-dim", "16", "--bank-size", "8", "--batch-size", "8", "--no-progress",
                             "--parameter", "model.visual_projection.*")
    assert code == 0, out + err
    assert f"features of {n_train} training records" in out
    assert np.load(store / "checkpoints" / "epoch-0002" / "features.npy").shape[0] == n_train


def test_data_check_and_preview_take_the_same_options(tab_world: tuple[Path, Path, int, int], tmp_path: Path
                                                      ) -> None:
    train_file, _, n_train, _ = tab_world
    code, out, err = _invoke("data", "check", train_file, "--sep", "tab", "--caption-key", "title", "--no-progress")
    assert code == 0, out + err
    assert f"{n_train} records" in out
    code, out, err = _invoke("data", "preview", train_file, "--sep", "tab", "--out", tmp_path / "sheet.png", "--n", "4")
    assert code == 0, out + err
    assert (tmp_path / "sheet.png").is_file()


def test_a_runs_data_options_are_found_and_a_model_directory_has_none(tab_run: Path) -> None:
    from cliptrace.train.config import run_data_options

    assert run_data_options(tab_run) == DataOptions(sep="\t")
    assert (tab_run / "model" / "config.json").is_file()  # HuggingFace's config, not a training run's
    assert run_data_options(tab_run / "model") is None
