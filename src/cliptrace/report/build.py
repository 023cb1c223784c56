"""Build the HTML report of a training run: model card, data attribution per target, input heatmaps.

The report is a self-contained folder (``index.html``, ``style.css``, ``targets-N.html`` list pages of
:data:`TARGETS_PER_PAGE` targets, ``targets/N.html`` one page per target, ``self_influence.html`` and ``assets/``)
that opens from disk with no server and no network. It is written to ``OUT.partial`` and renamed when complete.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure
from rich.progress import track

from cliptrace.data.images import ImageLoader
from cliptrace.data.options import DataOptions
from cliptrace.data.readers import select_split
from cliptrace.data.record import Record
from cliptrace.data.shapes import PLANTED
from cliptrace.evaluate import evaluate
from cliptrace.explain import explain, make_method
from cliptrace.explain.plot import method_grid, save_figure
from cliptrace.files import write_json_atomic
from cliptrace.models import load_model
from cliptrace.models.base import DualEncoder
from cliptrace.notices import CliptraceWarning
from cliptrace.train.config import run_data_options
from cliptrace.data.policy import BadSamplePolicy
from cliptrace.trak.attribute import Attribution, attribute, data_fingerprint
from cliptrace.trak.settings import DEFAULT_METHOD, AttributionSettings
from cliptrace.trak.gradients import parameter_fingerprint

TARGETS_PER_PAGE = 100
METRICS_CACHE = "test_metrics.json"
CACHE_KEY = "cache_key"
THUMBNAIL_SIZE = 128


@dataclass(frozen=True)
class Planted:
    """What data attribution found of the items planted in a shapes world.

    Attributes:
        duplicates_total: Planted near-duplicate pairs whose original is a target.
        duplicates_top1: Of those, how many have their duplicate as the top proponent.
        duplicates_topk: How many have it among the top-k proponents.
        mislabeled_total: Planted mislabeled training pairs.
        mislabeled_found: How many of them are among the ``window`` most self-influential pairs.
        window: The length of the self-influence list searched.
    """

    duplicates_total: int
    duplicates_top1: int
    duplicates_topk: int
    mislabeled_total: int
    mislabeled_found: int
    window: int


@dataclass(frozen=True)
class ReportSummary:
    """Where the report is and what it found."""

    index: Path
    n_targets: int
    metrics: dict[str, Any]
    planted: Planted | None


def planted_targets(data: str | Path, train: Sequence[Record]) -> list[Record]:
    """The training records that are originals of planted near-duplicates (none when ``data`` has no plan)."""
    plan = _planted_plan(data)
    by_id = {record.id: record for record in train}
    return [by_id[item["original"]] for item in (plan or {}).get("duplicates", []) if item["original"] in by_id]


def build_report(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    data_options: DataOptions | None = None,
    out: str | Path | None = None,
    targets: Sequence[Record] | None = None,
    n_targets: int = 24,
    target_split: str = "test",
    top_k: int = 8,
    methods: Sequence[str] = ("decomposition", "chefer"),
    checkpoints: int | None = None,
    attribution_method: str = DEFAULT_METHOD,
    settings: AttributionSettings = AttributionSettings(),
    store_dir: str | Path | None = None,
    on_bad_sample: str | BadSamplePolicy = "fail",
    self_influence_top: int = 100,
    progress: bool = True,
) -> ReportSummary:
    """Compute what a report needs for a training run and write it.

    Args:
        run_dir: A ``cliptrace train`` run (its final ``model/`` and ``checkpoints/``).
        data: The dataset it was trained on (default: the one in the run's ``config.json``).
        data_options: How to read it; default: the run's (its ``config.json``), with the options set here taking
            over.
        out: The report folder (default: ``RUN/report``); replaced if it exists.
        targets: Records to explain; default: the originals of planted near-duplicates (shapes world), then
            ``n_targets`` records of ``target_split`` drawn with ``settings.seed``.
        n_targets: Held-out targets when ``targets`` is not given.
        target_split: Their split.
        top_k: Proponents and opponents shown per target.
        methods: Input-attribution methods shown per target (see :func:`cliptrace.explain.method_names`).
        checkpoints: The attribution ensembles the last ``checkpoints`` checkpoints (all when None).
        attribution_method: The data-attribution method (:data:`cliptrace.attribution.METHODS`).
        settings: Its settings; ``settings.seed`` also seeds the target draw.
        store_dir: Its feature store (default: the run's store for these settings).
        on_bad_sample: ``"fail"`` at the first bad training sample, or ``"skip"`` bad samples (as the run did).
        self_influence_top: Training pairs listed on the self-influence page.
        progress: Show progress bars.

    Raises:
        ValueError: No ``config.json`` to find the data in, or no training/target records.
    """
    for name in methods:
        make_method(name)  # an unknown name fails now, not after the attribution
    run_dir = Path(run_dir)
    data = Path(data) if data is not None else _run_data(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    policy = on_bad_sample if isinstance(on_bad_sample, BadSamplePolicy) else BadSamplePolicy(on_bad_sample)
    records = policy.screen(policy.load(data, run_data_options(run_dir, data_options)))
    train = select_split(records, "train")
    if not train:
        raise ValueError(f"{data}: no records in split 'train'")
    model = load_model(run_dir / "model").eval()
    lds = _read_lds(run_dir / "verify" / "lds.json")  # before the long computations: a broken file fails now
    curation = _read_curation(run_dir / "curate")  # also before: a broken curation summary fails now
    metrics, eval_split = held_out_metrics(run_dir, model, records)
    if targets is None:
        targets = planted_targets(data, train) + _draw(select_split(records, target_split), n_targets, settings.seed)
    if not targets:
        raise ValueError(f"{data}: no targets (split {target_split!r} is empty)")
    attribution = attribute(run_dir, train, list(targets), method=attribution_method, settings=settings,
                            checkpoints=checkpoints, store_dir=store_dir, top_k=top_k, full_scores=False,
                            progress=progress)
    plan = _planted_plan(data)
    planted = _planted(plan, attribution, self_influence_top)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "targets").mkdir(parents=True)
    pages = _Pages(partial, run_dir.name, len(attribution.targets), _badges(plan))
    split_counts = {split: len(select_split(records, split)) for split in ("train", "val", "test")}
    pages.index(data, split_counts, model, run_dir, metrics, eval_split, attribution, methods, planted, settings,
                top_k, _training_curve(run_dir, partial / "assets" / "training.png"),
                _verification(run_dir, lds, partial), _curation_assets(curation, partial))
    pages.target_lists(attribution)
    for number in track(range(len(attribution.targets)), description="Report pages", disable=not progress):
        pages.target(number, model, attribution, methods)
    pages.self_influence(attribution, self_influence_top, planted)
    attribution.save(partial / "attribution")
    shutil.copyfile(Path(__file__).with_name("templates") / "style.css", partial / "style.css")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return ReportSummary(out / "index.html", len(attribution.targets), metrics, planted)


class _Pages:
    """Renders the report's pages into a folder, writing each image asset once."""

    def __init__(self, folder: Path, run_name: str, n_targets: int, badges: dict[str, str]) -> None:
        self.folder = folder
        self.common = {"run_name": run_name, "n_targets": n_targets}
        self.badges = badges
        self.loader = ImageLoader()
        self.environment = Environment(loader=PackageLoader("cliptrace.report", "templates"),
                                       autoescape=select_autoescape(["html"]))
        self.written: set[str] = set()

    def render(self, name: str, template: str, root: str = "", **fields: Any) -> None:
        html = self.environment.get_template(template).render(root=root, **self.common, **fields)
        (self.folder / name).write_text(html, encoding="utf-8")

    def thumbnail(self, record: Record, root: str) -> str:
        """The record's image as a PNG under ``assets/images`` (written once), as a link from ``root``."""
        name = f"assets/images/{_file_name(record.id)}.png"
        if name not in self.written:
            path = self.folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            image = self.loader.load(record.image).convert("RGB")
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            image.save(path)
            self.written.add(name)
        return root + name

    def index(self, data: Path, split_counts: dict[str, int], model: DualEncoder, run_dir: Path, metrics: dict,
              eval_split: str, attribution: Attribution, methods: Sequence[str], planted: Planted | None,
              settings: AttributionSettings, top_k: int, curve: Path | None, verification: dict | None,
              curation: dict | None) -> None:
        config = _read_json(run_dir / "config.json") or {}
        data_facts = [("dataset", str(data)), *[(f"{split} records", count) for split, count in split_counts.items()]]
        model_facts = [("adapter", type(model).__name__),
                       ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
                       *[(key, config[key]) for key in ("preset", "model", "epochs", "batch_size", "lr", "seed")
                         if config.get(key) is not None]]
        self.render("index.html", "index.html", title="Model card", data_facts=data_facts, model_facts=model_facts,
                    metric_facts=_metric_facts(metrics), eval_split=eval_split, planted=planted, top_k=top_k,
                    curve=None if curve is None else "assets/training.png", n_train=len(attribution.train),
                    checkpoints=attribution.checkpoints, proj_dim=settings.proj_dim, methods=methods,
                    attribution_method=attribution.method, damping=settings.describe_damping(),
                    verification=verification, curation=curation)

    def target_lists(self, attribution: Attribution) -> None:
        count = len(attribution.targets)
        page_count = max(1, math.ceil(count / TARGETS_PER_PAGE))
        for page in range(1, page_count + 1):
            first = (page - 1) * TARGETS_PER_PAGE
            rows = []
            for number in range(first, min(first + TARGETS_PER_PAGE, count)):
                target = attribution.targets[number]
                top = attribution.train[int(attribution.top.proponents[number, 0])]
                rows.append({"number": number + 1, "id": target.id, "caption": target.captions[0],
                             "image": self.thumbnail(target, ""), "badge": self.badges.get(target.id),
                             "top_id": top.id, "top_caption": top.captions[0], "top_image": self.thumbnail(top, ""),
                             "top_badge": self.badges.get(top.id),
                             "top_score": float(attribution.top.proponent_scores[number, 0])})
            self.render(f"targets-{page}.html", "targets.html", title=f"Targets, page {page}", rows=rows, page=page,
                        pages=range(1, page_count + 1), first=first + 1, last=first + len(rows))

    def target(self, number: int, model: DualEncoder, attribution: Attribution, methods: Sequence[str]) -> None:
        record = attribution.targets[number]
        image = self.loader.load(record.image).convert("RGB")
        pixels = model.preprocess(image).unsqueeze(0)
        results = [explain(model, pixels, record.captions[0], method=name) for name in methods]
        heatmaps = f"assets/maps/{number + 1}.png"
        save_figure(method_grid(model.preprocess.unnormalize(pixels[0]), results, caption=record.captions[0],
                                columns=len(methods) + 1), self.folder / heatmaps)
        groups = []
        for title, kind, indices, scores in (
            ("Top proponents", "proponents", attribution.top.proponents, attribution.top.proponent_scores),
            ("Top opponents", "opponents", attribution.top.opponents, attribution.top.opponent_scores),
        ):
            pairs = [{"id": record.id, "caption": record.captions[0], "image": self.thumbnail(record, "../"),
                      "badge": self.badges.get(record.id), "score": float(score)}
                     for record, score in zip((attribution.train[i] for i in indices[number].tolist()),
                                              scores[number].tolist())]
            groups.append((title, kind, pairs))
        count = len(attribution.targets)
        self.render(f"targets/{number + 1}.html", "target.html", root="../", title=f"Target {number + 1}",
                    number=number + 1, id=record.id, caption=record.captions[0], badge=self.badges.get(record.id),
                    logit=float(results[0].logit[0]), image=self.thumbnail(record, "../"),
                    heatmaps="../" + heatmaps, methods=list(methods), groups=groups,
                    previous=number if number > 0 else None, next=number + 2 if number + 1 < count else None,
                    list_page=number // TARGETS_PER_PAGE + 1)

    def self_influence(self, attribution: Attribution, top: int, planted: Planted | None) -> None:
        order = np.argsort(-attribution.self_influence, kind="stable")[:top]
        rows = [{"rank": rank, "id": attribution.train[i].id, "caption": attribution.train[i].captions[0],
                 "image": self.thumbnail(attribution.train[i], ""), "badge": self.badges.get(attribution.train[i].id),
                 "score": float(attribution.self_influence[i])}
                for rank, i in enumerate(order.tolist(), 1)]
        self.render("self_influence.html", "self_influence.html", title="Self-influence", rows=rows, planted=planted)


def _run_data(run_dir: Path) -> Path:
    config = _read_json(run_dir / "config.json")
    if config is None or "data" not in config:
        raise ValueError(f"{run_dir}: no config.json naming the training data; pass the dataset explicitly")
    return Path(config["data"])


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path`` (None when there is no such file).

    Raises:
        ValueError: Naming ``path``, when it does not hold a valid UTF-8 JSON object.
    """
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # also not UTF-8, nested too deeply
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, not {type(value).__name__}")
    return value


def _metrics_key(model: DualEncoder, held_out: list[Record], split: str) -> dict[str, str]:
    """What held-out metrics depend on: the held-out records (ids, images, captions), their split, the weights."""
    names = [name for name, _ in model.named_parameters()]
    return {"data": data_fingerprint(held_out), "split": split, "model": parameter_fingerprint(model, names)}


def held_out_metrics(run_dir: Path, model: DualEncoder, records: list[Record]) -> tuple[dict, str]:
    """The model's metrics on the held-out split of ``records`` and that split's name.

    ``RUN/test_metrics.json`` caches them with the :func:`_metrics_key` of what they were computed from (under
    ``cache_key``); a cache of other data or weights, or an unreadable one (with a warning), is computed again and
    replaced atomically.
    """
    split = "test" if select_split(records, "test") else "val"
    held_out = select_split(records, split)
    if not held_out:
        return {}, split
    path, key = run_dir / METRICS_CACHE, _metrics_key(model, held_out, split)
    try:
        saved = _read_json(path)
    except ValueError as error:
        warnings.warn(f"{error}; computing the metrics again", CliptraceWarning, stacklevel=2)
        saved = None
    if saved is not None and saved.get(CACHE_KEY) == key:
        return {name: value for name, value in saved.items() if name != CACHE_KEY}, split
    with torch.no_grad():
        metrics = evaluate(model, held_out, ImageLoader())
    write_json_atomic(path, {**metrics, CACHE_KEY: key}, sort_keys=False)
    return metrics, split


METRIC_NAMES = {"i2t_R@1": "image→text R@1 (%)", "i2t_R@5": "image→text R@5 (%)", "t2i_R@1": "text→image R@1 (%)",
                "t2i_R@5": "text→image R@5 (%)", "i2t_median_rank": "image→text median rank",
                "t2i_median_rank": "text→image median rank", "zeroshot_top1": "zero-shot top-1 (%)",
                "zeroshot_top5": "zero-shot top-5 (%)", "n_images": "images", "n_captions": "captions"}


def _metric_facts(metrics: dict) -> list[tuple[str, str]]:
    return [(title, f"{metrics[key]:.4g}") for key, title in METRIC_NAMES.items() if key in metrics]


def _training_curve(run_dir: Path, path: Path) -> Path | None:
    """Loss per step and validation recall per epoch, from the run's ``train.csv`` and ``eval.csv``."""
    steps = _read_csv(run_dir / "train.csv")
    if not steps:
        return None
    evals = _read_csv(run_dir / "eval.csv")
    figure = Figure(figsize=(9, 3.2))
    loss, recall = figure.subplots(1, 2)
    loss.plot([float(row["step"]) for row in steps], [float(row["loss"]) for row in steps], lw=0.8)
    loss.set(xlabel="step", ylabel="training loss", title="Contrastive loss")
    for key, label in (("i2t_R@1", "image→text R@1"), ("t2i_R@1", "text→image R@1"),
                       ("zeroshot_top1", "zero-shot top-1")):
        if evals and key in evals[0]:
            recall.plot([float(row["epoch"]) for row in evals], [float(row[key]) for row in evals], marker=".",
                        label=label)
    recall.set(xlabel="epoch", ylabel="%", title="Validation")
    if evals:
        recall.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    return path


def _verification(run_dir: Path, lds: dict | None, folder: Path) -> dict | None:
    """The results of ``cliptrace verify`` in ``RUN/verify`` (its ``lds``, the removal plot), when it was run."""
    plot = run_dir / "verify" / "removal.png"
    if lds is None and not plot.is_file():
        return None
    if plot.is_file():
        (folder / "assets").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, folder / "assets" / "removal.png")
    return {"lds": lds, "removal": "assets/removal.png" if plot.is_file() else None}


def _read_curation(directory: Path) -> dict | None:
    """What ``cliptrace curate`` wrote to ``directory`` (its summary and the --verify comparison), if it ran.

    Raises:
        ValueError: Naming the file, when ``curation.json`` or ``verify.json`` is not what that command writes.
    """
    summary = _read_json(directory / "curation.json")
    if summary is None:
        return None
    if not all(isinstance(summary.get(key), int) for key in ("removed", "n_train")):
        raise ValueError(f"{directory / 'curation.json'}: expected the JSON object 'cliptrace curate' writes, with "
                         "integer 'removed' and 'n_train'; run it again or remove the folder")
    comparison = _read_json(directory / "verify.json")
    number = (int, float)
    if comparison is not None and not (isinstance(comparison.get("comparisons"), list) and all(
            isinstance(table, dict) and isinstance(table.get("metric"), str) and isinstance(table.get("arms"), list)
            and all(isinstance(row, dict) and isinstance(row.get("arm"), str)
                    and all(isinstance(row.get(key), number) for key in ("mean", "low", "high"))
                    and all(row.get(key) is None or isinstance(row.get(key), number)
                            for key in ("difference", "difference_low", "difference_high"))
                    for row in table["arms"])
            for table in comparison["comparisons"])):
        raise ValueError(f"{directory / 'verify.json'}: expected the JSON object 'cliptrace curate --verify' "
                         "writes, with 'comparisons' listing per metric each arm's mean, low and high; run it again "
                         "or remove the file")
    return {"directory": directory, "summary": summary, "comparison": comparison}


def _curation_assets(curation: dict | None, folder: Path) -> dict | None:
    """``curation`` with its --verify plot copied to ``folder/assets/curation.png`` (``plot``: its link, or None)."""
    if curation is None:
        return None
    plot = curation["directory"] / "verify.png"
    if curation["comparison"] is None or not plot.is_file():
        return {**curation, "plot": None}
    (folder / "assets").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plot, folder / "assets" / "curation.png")
    return {**curation, "plot": "assets/curation.png"}


def _read_lds(path: Path) -> dict | None:
    """The results ``cliptrace verify lds`` wrote to ``path`` (None when there are none).

    Raises:
        ValueError: Naming ``path``, when it is not the JSON object that command writes.
    """
    lds = _read_json(path)
    if lds is None:
        return None
    results = lds.get("results")
    if not isinstance(results, dict) or not all(
        isinstance(row, dict) and all(isinstance(row.get(name), (int, float)) for name in ("lds", "low", "high"))
        for row in results.values()
    ):
        raise ValueError(f"{path}: expected the JSON object 'cliptrace verify lds' writes, with 'results' mapping "
                         "each method to its lds, low and high; run it again or remove the file")
    return lds


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _planted_plan(data: str | Path) -> dict | None:
    path = Path(data)
    root = path if path.is_dir() else path.parent
    return _read_json(root / PLANTED)


def _badges(plan: dict | None) -> dict[str, str]:
    """Labels for the records a shapes world planted: near-duplicates, their originals, mislabeled captions."""
    badges: dict[str, str] = {}
    for item in (plan or {}).get("duplicates", []):
        badges[item["original"]] = "has a planted duplicate"
        badges[item["duplicate"]] = "planted duplicate"
    for item in (plan or {}).get("mislabeled", []):
        badges[item["id"]] = "planted mislabel"
    return badges


def _planted(plan: dict | None, attribution: Attribution, window: int) -> Planted | None:
    if not plan or not (plan.get("duplicates") or plan.get("mislabeled")):
        return None
    column = {record.id: i for i, record in enumerate(attribution.targets)}
    duplicate_of = {item["original"]: item["duplicate"] for item in plan.get("duplicates", [])
                    if item["original"] in column}
    top1 = topk = 0
    for original, duplicate in duplicate_of.items():
        ids = [attribution.train[i].id for i in attribution.top.proponents[column[original]].tolist()]
        top1 += ids[0] == duplicate
        topk += duplicate in ids
    order = np.argsort(-attribution.self_influence, kind="stable")[:window]
    top_ids = {attribution.train[i].id for i in order.tolist()}
    mislabeled = [item["id"] for item in plan.get("mislabeled", [])]
    return Planted(len(duplicate_of), top1, topk, len(mislabeled), sum(i in top_ids for i in mislabeled),
                   min(window, len(attribution.train)))


def _draw(records: list[Record], count: int, seed: int) -> list[Record]:
    chosen = np.random.default_rng(seed).permutation(len(records))[:count]
    return [records[i] for i in sorted(chosen.tolist())]


def _file_name(record_id: str) -> str:
    """A safe, unique file name for a record id."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in record_id)[:80]
    return safe if safe == record_id else f"{safe}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
