"""Grade attribution methods on a dataset: faithfulness curves, ground-truth localization and wall time.

On the shapes world every case is a two-object image explained against the zero-shot class of *one* of its
objects, so a map is right when it lands on that object and not on the other (pointing game, mask overlap). On any
other dataset the cases are images with their first caption, graded by deletion/insertion alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cliptrace.data.images import ImageLoader
from cliptrace.data.options import DataOptions
from cliptrace.data.record import Record
from cliptrace.data.shapes import METADATA, load_mask, load_objects
from cliptrace.evaluate.templates import IMAGENET_TEMPLATES
from cliptrace.explain.api import explain, make_method, resolve_target
from cliptrace.explain.base import patch_grid
from cliptrace.explain.metrics import (
    completeness_error,
    logit_score,
    mask_overlap,
    object_mask,
    perturbation_curve,
    pointing_game,
    randomization_check,
)
from cliptrace.models.base import DualEncoder

# (name, mode, level, substrate): deletion onto the dataset-mean colour, insertion from a blurred image (RISE)
CURVES: tuple[tuple[str, str, str, str], ...] = (
    ("deletion_patch", "deletion", "patch", "zero"),
    ("insertion_patch", "insertion", "patch", "blur"),
    ("deletion_pixel", "deletion", "pixel", "zero"),
    ("insertion_pixel", "insertion", "pixel", "blur"),
)


@dataclass(frozen=True)
class Case:
    """One image to explain against a caption or a class, with the ground-truth pixels when known.

    Attributes:
        id: The record id.
        pixels: The preprocessed image (3, H, W).
        caption: The caption to explain (``None`` for a class target).
        target_class: The zero-shot class to explain (``None`` for a caption target).
        mask: The pixels (H, W) of the object the target names, after the same resize and crop as the image.
    """

    id: str
    pixels: torch.Tensor
    caption: str | None = None
    target_class: str | None = None
    mask: torch.Tensor | None = None


def load_cases(model: DualEncoder, data: str | Path, *, data_options: DataOptions | None = None,
               split: str | None = "test", limit: int = 100, seed: int = 0) -> list[Case]:
    """Up to ``limit`` cases from a dataset (read with ``data_options``): shapes-world object cases when ``data`` is
    one, caption cases otherwise.

    Raises:
        ValueError: The split holds no usable record.
    """
    data = Path(data)
    records = [record for record in (data_options or DataOptions()).load(data) if not split or record.split == split]
    root = data if data.is_dir() else data.parent
    rng = np.random.default_rng(seed)
    loader = ImageLoader()
    cases = (_shapes_cases(model, root, records, rng, limit, loader) if (root / METADATA).is_file()
             else _caption_cases(model, records, rng, limit, loader))
    if not cases:
        raise ValueError(f"{data}: no record to explain" + (f" in split {split!r}" if split else ""))
    return cases


def _shapes_cases(model: DualEncoder, root: Path, records: list[Record], rng: np.random.Generator, limit: int,
                  loader: ImageLoader) -> list[Case]:
    """Two-object images whose objects have different class names, each against one object's class."""
    objects = load_objects(root)
    cases = []
    for record in (records[i] for i in rng.permutation(len(records)).tolist()):
        scene = objects.get(record.id, [])
        names = [f"{obj['color']} {obj['shape']}" for obj in scene]
        if len(scene) != 2 or names[0] == names[1]:
            continue
        name = names[int(rng.integers(2))]
        mask = object_mask(load_mask(root, record.id), scene, name)
        resized = model.preprocess.resize_crop(Image.fromarray(mask.numpy()), Image.Resampling.NEAREST)
        cases.append(Case(record.id, model.preprocess(loader.load(record.image)), target_class=name,
                          mask=torch.from_numpy(np.array(resized))))
        if len(cases) == limit:
            break
    return cases


def _caption_cases(model: DualEncoder, records: list[Record], rng: np.random.Generator, limit: int,
                   loader: ImageLoader) -> list[Case]:
    """Images with their first caption."""
    chosen = rng.permutation(len(records))[:limit]
    return [Case(records[i].id, model.preprocess(loader.load(records[i].image)), caption=records[i].captions[0])
            for i in chosen.tolist()]


def evaluate_methods(
    model: DualEncoder,
    cases: Sequence[Case],
    methods: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    steps: int = 16,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, float | str]]:
    """One row per (case, method): logit, seconds, curve AUCs, localization and completeness where they apply.

    AUCs are areas under the raw logit curve over the perturbed fraction (logit units): deletion lower is better,
    insertion higher. (Dividing by the unperturbed logit explodes for images whose logit is near zero.)
    ``pointing``, ``energy`` and ``iou`` need a ground-truth mask; ``completeness`` is set for decompositions.
    With ``classes`` (class cases only), each case's class is contrasted with the mean of the other classes;
    ``templates`` make the class embeddings (default: the ones ``cliptrace eval`` uses).
    """
    from rich.progress import track

    dtype = model.logit_scale.dtype
    pixels = torch.stack([case.pixels for case in cases]).to(dtype)
    captions = [case.caption for case in cases]
    names = [case.target_class for case in cases]
    text = None if captions[0] is None else captions
    target_class = None if names[0] is None else names
    _, side, offset = resolve_target(model, len(cases), text, target_class=target_class, classes=classes,
                                     templates=templates)
    side = side if offset is None else side - offset
    masks = None if cases[0].mask is None else torch.stack([case.mask for case in cases])
    grid = patch_grid(model, pixels)
    rows: list[dict[str, float | str]] = []
    work = [(name, start) for name in methods for start in range(0, len(cases), batch_size)]
    for name, start in track(work, description="explaining", disable=not progress):
        chunk = slice(start, start + batch_size)
        result = explain(model, pixels[chunk], None if text is None else text[chunk],
                         target_class=None if target_class is None else target_class[chunk], classes=classes,
                         templates=templates, word_maps=False, method=name, batch_size=batch_size)
        image_map = result.image_map.detach().to(torch.float64)
        score = logit_score(model, side[chunk])
        measures: dict[str, torch.Tensor] = {}
        for key, mode, level, substrate in CURVES:
            curve = perturbation_curve(score, pixels[chunk], image_map, mode=mode, level=level, substrate=substrate,
                                       grid=grid, steps=steps, batch_size=64)
            measures[key] = curve.auc()
        if masks is not None:
            measures.update(mask_overlap(image_map, masks[chunk]))
            measures["pointing"] = pointing_game(image_map, masks[chunk]).double()
        if result.image_constant is not None:
            measures["completeness"] = torch.stack(list(completeness_error(result).values())).amax(0)
        for offset, case in enumerate(cases[chunk]):
            row: dict[str, float | str] = {"id": case.id, "method": name, "logit": float(result.logit[offset]),
                                           "seconds": result.seconds / len(result.logit)}
            row.update({key: float(values[offset]) for key, values in measures.items()})
            rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, float | str]]) -> list[dict[str, float | str]]:
    """Per method: the mean of every measure and the half-width of its 95 % confidence interval (``±`` keys)."""
    methods = list(dict.fromkeys(str(row["method"]) for row in rows))
    keys = [key for key in rows[0] if key not in ("id", "method")]
    summary = []
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        entry: dict[str, float | str] = {"method": method, "n": float(len(mine))}
        for key in keys:
            values = np.array([float(row[key]) for row in mine if key in row], dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                continue
            entry[key] = float(values.mean())
            spread = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
            entry[f"{key}±"] = 1.96 * spread
        summary.append(entry)
    return summary


def sanity_checks(model: DualEncoder, cases: Sequence[Case], methods: Sequence[str], *, seed: int = 0,
                  templates: Sequence[str] = IMAGENET_TEMPLATES) -> list[dict[str, float | str | bool]]:
    """The model-randomization check of each method on the cases: Spearman ρ after full randomization and verdict.

    ``templates`` make the class embeddings of class cases.
    """
    dtype = model.logit_scale.dtype
    pixels = torch.stack([case.pixels for case in cases]).to(dtype)
    captions = [case.caption for case in cases]
    text = None if captions[0] is None else captions
    target_class = None if text is not None else [case.target_class for case in cases]
    _, side, _ = resolve_target(model, len(cases), text, target_class=target_class, templates=templates)
    results = []
    for name in methods:
        method = make_method(name)
        start = time.perf_counter()
        check = randomization_check(model, method.attribute_image, pixels, side, seed=seed)
        results.append({"method": name, "rho_top_layer": check.correlations[0], "rho_full": check.correlations[-1],
                        "passed": check.passed(), "seconds": time.perf_counter() - start})
    return results


SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pointing", "pointing game ↑"), ("energy", "energy in mask ↑"), ("iou", "top-k IoU ↑"),
    ("deletion_patch", "deletion AUC, patches ↓"), ("insertion_patch", "insertion AUC, patches ↑"),
    ("deletion_pixel", "deletion AUC, pixels ↓"), ("insertion_pixel", "insertion AUC, pixels ↑"),
    ("completeness", "completeness error"), ("seconds", "seconds / image"),
)


def summary_markdown(summary: Sequence[dict[str, float | str]]) -> str:
    """A Markdown table of :func:`summarize`'s output: mean ± 95 % CI half-width, columns that any method has."""
    columns = [(key, title) for key, title in SUMMARY_COLUMNS if any(key in entry for entry in summary)]
    lines = ["| method | n | " + " | ".join(title for _, title in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for entry in summary:
        cells = []
        for key, _ in columns:
            if key not in entry:
                cells.append("–")
            elif key in ("completeness", "seconds"):
                cells.append(f"{entry[key]:.2g}")
            else:
                cells.append(f"{entry[key]:.3f} ± {entry[key + '±']:.3f}")
        lines.append(f"| {entry['method']} | {int(entry['n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
