"""benchmarks/lds_methods.py: pair scores to record scores, and the paired bootstrap of two methods' LDS."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from cliptrace.verify.lds import LDSResult

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "lds_methods.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        spec = importlib.util.spec_from_file_location("lds_methods", BENCHMARK)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARK.parent))


def test_record_means_average_each_records_pairs(bench):
    owner = np.array([0, 0, 1, 2, 2, 2, 1])
    pair_scores = np.random.default_rng(0).normal(size=(len(owner), 3))
    means = bench.record_means(pair_scores, owner, 3)
    for record in range(3):
        rows = [pair_scores[p] for p in range(len(owner)) if owner[p] == record]
        for target in range(3):
            assert means[record, target] == pytest.approx(sum(row[target] for row in rows) / len(rows), abs=1e-12)


def test_record_means_refuse_a_record_without_pairs(bench):
    with pytest.raises(ValueError, match="cover records"):
        bench.record_means(np.zeros((2, 1)), np.array([0, 2]), 3)
    with pytest.raises(ValueError, match="pair owners"):
        bench.record_means(np.zeros((2, 1)), np.array([0]), 1)


def result(per_target: np.ndarray) -> LDSResult:
    return LDSResult(per_target, float(np.nanmean(per_target)), 0.0, 0.0, 3, len(per_target), 0)


def test_paired_ratio_resamples_targets_jointly(bench):
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 0.5, 40), rng.uniform(0.1, 0.5, 40)
    a[3], b[7] = np.nan, np.nan
    grader = bench.Grader(np.zeros((3, 2)), np.zeros((3, 2)), seed=5)
    estimate, low, high = grader.paired(result(a), result(b), bench.ratio)

    keep = [i for i in range(40) if i not in (3, 7)]
    draw = np.random.default_rng(5)
    ratios = []
    for _ in range(1000):
        rows = [keep[i] for i in draw.integers(0, len(keep), len(keep))]
        ratios.append(sum(a[i] for i in rows) / sum(b[i] for i in rows))
    assert estimate == pytest.approx(sum(a[i] for i in keep) / sum(b[i] for i in keep), rel=1e-12)
    assert (low, high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])), rel=1e-12)


def test_store_bytes_counts_only_npy_files(bench, tmp_path):
    (tmp_path / "checkpoints" / "a").mkdir(parents=True)
    np.save(tmp_path / "checkpoints" / "a" / "features.npy", np.zeros(10, np.float32))
    (tmp_path / "manifest.json").write_text("{}")
    expected = (tmp_path / "checkpoints" / "a" / "features.npy").stat().st_size
    assert bench.store_bytes(tmp_path) == expected
    assert bench.store_bytes(tmp_path / "missing") == 0
