"""The shapes world: procedural images of coloured shapes with captions and a ground-truth mask per object.

Coordinates are in pixels, x to the right and y down; pixel (x, y) covers the square [x, x+1) × [y, y+1), so a
bounding box ``(x0, y0, x1, y1)`` covers ``mask[y0:y1, x0:x1]`` (end exclusive). A pixel belongs to a shape when
its centre lies inside the shape: no anti-aliasing, and the mask is exactly the set of drawn pixels.

Everything is deterministic from the seed. Each image has its own generators, ``default_rng([seed, SCENE, i])``
for its scene and captions and ``default_rng([seed, RENDER, i])`` for its pixels, so image ``i`` is the same
whatever the number of images, the splits or the output format.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cliptrace.data.formats.delimited import write_csv_rows
from cliptrace.data.formats.jsonl import write_jsonl_lines
from cliptrace.data.formats.webdataset import ShardWriter
from cliptrace.data.record import DatasetError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
INVERSE_RELATION: dict[str, str] = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
FORMATS: tuple[str, ...] = ("csv", "jsonl", "wds")
FORMAT_VERSION = 1

SIZE_FRACTIONS: dict[str, float] = {"small": 0.2, "large": 0.36}  # side length as a fraction of the image side
SIZE_JITTER = 0.08  # relative spread of the side length around its size class
CROSS_THICKNESS = 1 / 3  # bar thickness of a cross as a fraction of its side
BORDER_FRACTION = 0.03  # free border around the image edge
GAP_FRACTION = 0.08  # least gap between two objects along their relation's axis
OFF_AXIS_RATIO = 0.5  # centre offset across the relation's axis, at most this fraction of the offset along it
SINGLE_OBJECT_PROBABILITY = 1 / 3
COLOR_JITTER = 12  # per-channel spread of an object's colour around its named colour
NOISE_AMPLITUDE = 10  # per-pixel, per-channel uniform noise on the whole image
BACKGROUND_RANGE = (215, 245)  # grey level of the light background
BACKGROUND_TINT = 6  # per-channel spread of the background around its grey level
DUPLICATE_NOISE = 3  # per-pixel noise a near-duplicate adds to its original
MIN_IMAGE_SIZE = 32  # the smallest side on which two large objects fit with a gap

SCENE, RENDER, DUPLICATE, PLAN = range(4)  # generator streams, see the module docstring

CAPTIONS_CSV = "captions.csv"
CAPTIONS_JSONL = "captions.jsonl"
SHARDS = "shards"
IMAGES = "images"
MASKS = "masks"
OBJECTS = "objects.jsonl"
PLANTED = "planted.json"
METADATA = "shapes_world.json"


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: One of :data:`SHAPES`.
        color: One of the names in :data:`COLORS`.
        size: One of :data:`SIZES`.
        bbox: ``(x0, y0, x1, y1)`` in pixels, end exclusive.
        center: ``(cx, cy)``, the centre of the bounding box.
    """

    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]

    @property
    def name(self) -> str:
        """``"COLOR SHAPE"``, e.g. ``"red circle"``."""
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict:
        """A JSON-serializable description."""
        return {"shape": self.shape, "color": self.color, "size": self.size, "bbox": list(self.bbox),
                "center": list(self.center)}


@dataclass(frozen=True)
class Scene:
    """The objects of one image.

    Attributes:
        objects: One or two objects with distinct names, in caption order.
        relation: For two objects, where the first lies relative to the second (one of :data:`RELATIONS`).
    """

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    @property
    def label(self) -> str:
        """The class name of a single-object scene, ``""`` otherwise."""
        return self.objects[0].name if len(self.objects) == 1 else ""


def class_names() -> list[str]:
    """Every ``"COLOR SHAPE"`` combination, the classes of zero-shot classification."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def sample_scene(rng: np.random.Generator, *, image_size: int, max_objects: int = 2) -> Scene:
    """A random scene of 1..``max_objects`` (at most 2) non-overlapping objects inside an ``image_size`` square.

    Two objects have distinct names and lie clearly apart along their relation's axis: their boxes are separated
    by a gap, and their centres are closer across that axis than half their distance along it.
    """
    _check_scene_settings(image_size, max_objects)
    border = _border(image_size)
    combos = [(color, shape) for color in COLORS for shape in SHAPES]
    two = max_objects == 2 and rng.random() >= SINGLE_OBJECT_PROBABILITY
    picks = rng.choice(len(combos), size=2 if two else 1, replace=False)
    sizes = [SIZES[rng.integers(len(SIZES))] for _ in picks]
    sides = [_side(size, image_size, rng) for size in sizes]
    if not two:
        x0, y0 = rng.integers(border, image_size - border - sides[0] + 1, size=2)
        boxes = [(x0, y0, sides[0])]
        relation = None
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        boxes = _place_pair(rng, image_size, border, sides, relation)
    objects = []
    for (color, shape), size, (x0, y0, side) in zip((combos[i] for i in picks), sizes, boxes):
        x0, y0, side = int(x0), int(y0), int(side)
        bbox = (x0, y0, x0 + side, y0 + side)
        objects.append(ShapeObject(shape, color, size, bbox, (x0 + side / 2, y0 + side / 2)))
    return Scene(tuple(objects), relation)


def render_scene(
    scene: Scene, image_size: int, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """Draw ``scene`` on a noisy light background.

    Returns:
        The RGB image and its mask: a uint8 (image_size, image_size) label map, 0 for background and k for the
        k-th object (1-based, in scene order).
    """
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for k, obj in enumerate(scene.objects, start=1):
        x0, y0, x1, y1 = obj.bbox
        if x0 < 0 or y0 < 0 or x1 > image_size or y1 > image_size:
            raise ValueError(f"object {k} ({obj.name}) at {obj.bbox} does not fit a {image_size}-pixel image")
        mask[y0:y1, x0:x1][_shape_pixels(obj.shape, x1 - x0)] = k
    grey = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1)
    pixels = np.empty((image_size, image_size, 3), dtype=np.int16)
    pixels[:] = grey + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    for k, obj in enumerate(scene.objects, start=1):
        pixels[mask == k] = np.array(COLORS[obj.color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    pixels += rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), mask


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """2–3 distinct captions, each naming the colour and shape of every object, sometimes with its size.

    One object: ``"a large red circle"``, ``"a red circle"``. Two objects: the relation read both ways, e.g.
    ``"a red circle above a small blue square"`` and ``"a small blue square below a red circle"``, plus one with
    every size named. The article is ``"an"`` before a vowel (``"an orange cross"``).
    """
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        return [_phrase(obj, sized=True), _phrase(obj, sized=False)]
    first, second = scene.objects
    forward = (first, scene.relation, second)
    backward = (second, INVERSE_RELATION[scene.relation], first)
    captions = [
        _sentence(*forward, sized=(rng.random() < 0.5, rng.random() < 0.5)),
        _sentence(*backward, sized=(rng.random() < 0.5, rng.random() < 0.5)),
        _sentence(*(forward if rng.random() < 0.5 else backward), sized=(True, True)),
    ]
    return list(dict.fromkeys(captions))


def generate_shapes_world(
    out_dir: str | Path,
    *,
    n_images: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    format: str = "csv",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_objects: int = 2,
    n_duplicates: int = 0,
    n_mislabeled: int = 0,
    shard_size: int = 1000,
    progress: bool = False,
) -> Path:
    """Write a shapes world dataset to ``out_dir`` (which must be absent or empty).

    Layout: ``images/ID.png`` with ``captions.csv`` (``filepath,title,split,label,id``, one row per caption) or
    ``captions.jsonl``; or, for ``format="wds"``, ``shards/shard-NNNNNN.tar`` with members ``ID.png``, ``ID.json``
    and ``ID.txt``. Always ``masks/ID.png``, ``objects.jsonl``, ``planted.json`` and ``shapes_world.json``.
    ``label`` is the class name (``"COLOR SHAPE"``) of single-object images and ``""`` otherwise; it describes
    the image, also for planted mislabeled captions.

    Planted items, all in the train split: near-duplicates (new ids ``shapes-dup-NNNNNN``) copy a train image with
    a shift of at most one pixel and a little noise, keeping its captions; mislabeled train images show the
    captions of another train image that differs in a named colour or shape.

    The files are written to a sibling ``.partial`` directory that takes the place of ``out_dir`` only when
    complete. The train count in ``shapes_world.json`` includes the near-duplicates. ``progress`` shows a bar over
    the images written (on stderr, removed when done).

    Returns:
        The path to read the records from: ``captions.csv``, ``captions.jsonl`` or the ``shards`` directory.

    Raises:
        ValueError: A setting out of range, e.g. too few images for the splits or more planted items than
            train images.
        FileExistsError: ``out_dir`` exists and is not an empty directory.
    """
    counts = _split_counts(n_images, val_fraction, test_fraction)
    _check_settings(format, image_size, seed, max_objects, shard_size)
    if min(n_duplicates, n_mislabeled) < 0:
        raise ValueError("n_duplicates and n_mislabeled must be non-negative")
    if n_duplicates + n_mislabeled > counts["train"]:
        raise ValueError(
            f"n_duplicates ({n_duplicates}) + n_mislabeled ({n_mislabeled}) exceed the {counts['train']} train images"
        )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose another output directory")

    scenes, captions = [], []
    for index in range(n_images):
        rng = np.random.default_rng([seed, SCENE, index])
        scenes.append(sample_scene(rng, image_size=image_size, max_objects=max_objects))
        captions.append(captions_for(scenes[-1], rng))
    splits, duplicated, mislabeled = _plan(np.random.default_rng([seed, PLAN]), scenes, counts, n_duplicates,
                                           n_mislabeled)
    shown = list(captions)
    for index, donor in mislabeled.items():
        shown[index] = captions[donor]

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    examples = _examples(seed, image_size, scenes, shown, splits, duplicated)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True, disable=not progress) as bar:
        tracked = bar.track(examples, total=n_images + n_duplicates, description="writing images")
        data = _write_examples(partial, format, tracked, shard_size)
    _write_json(partial / PLANTED, {
        "duplicates": [{"original": _image_id(i), "duplicate": _duplicate_id(j)} for j, i in enumerate(duplicated)],
        "mislabeled": [{"id": _image_id(i), "captions": shown[i], "true_captions": captions[i]} for i in mislabeled],
    })
    settings = {"n_images": n_images, "image_size": image_size, "seed": seed, "val_fraction": val_fraction,
                "test_fraction": test_fraction, "max_objects": max_objects, "n_duplicates": n_duplicates,
                "n_mislabeled": n_mislabeled, "shard_size": shard_size}
    counts["train"] += n_duplicates
    _write_json(partial / METADATA, {
        "format_version": FORMAT_VERSION, "format": format, "data": data, "settings": settings, "counts": counts,
        "classes": class_names(), "shapes": list(SHAPES), "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "sizes": list(SIZES), "relations": list(RELATIONS),
    })
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out / data


def load_mask(dataset_dir: str | Path, id: str) -> np.ndarray:
    """The uint8 label map of image ``id`` (0 background, k the k-th object of its ``objects.jsonl`` entry).

    ``dataset_dir`` is the dataset directory or the path :func:`generate_shapes_world` returned.
    """
    path = _root(dataset_dir) / MASKS / f"{id}.png"
    if not path.is_file():
        raise DatasetError(str(path.parent), f"id {id!r}", "no mask for this image")
    with Image.open(path) as image:
        if image.mode != "L":
            raise DatasetError(str(path), None, f"expected an 8-bit label map, got mode {image.mode}")
        return np.array(image)


def load_objects(dataset_dir: str | Path) -> dict[str, list[dict]]:
    """The objects of every image, by id: dicts with ``shape``, ``color``, ``size``, ``bbox`` and ``center``.

    ``dataset_dir`` is the dataset directory or the path :func:`generate_shapes_world` returned.
    """
    path = _root(dataset_dir) / OBJECTS
    objects: dict[str, list[dict]] = {}
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            try:
                entry = json.loads(line)
                objects[entry["id"]] = entry["objects"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DatasetError(str(path), f"line {number}", f"expected an object with 'id' and 'objects' ({error})")
    return objects


@dataclass(frozen=True)
class _Example:
    """One image to write, with everything the files say about it."""

    id: str
    image: Image.Image
    mask: np.ndarray
    scene: Scene
    captions: list[str]
    split: str


def _border(image_size: int) -> int:
    return max(1, round(BORDER_FRACTION * image_size))


def _side(size: str, image_size: int, rng: np.random.Generator) -> int:
    return round(SIZE_FRACTIONS[size] * image_size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))


def _place_pair(
    rng: np.random.Generator, image_size: int, border: int, sides: list[int], relation: str
) -> list[tuple[int, int, int]]:
    """Top-left corners and sides ``(x0, y0, side)`` of two objects, the first ``relation`` the second."""
    gap = max(2, round(GAP_FRACTION * image_size))
    first_low = relation in ("above", "left of")  # the first object has the smaller coordinate along the axis
    low, high = (sides[0], sides[1]) if first_low else (sides[1], sides[0])
    slack = image_size - 2 * border - low - high - gap
    cut_a, cut_b = sorted(rng.integers(0, slack + 1, size=2))
    start_low = border + cut_a
    start_high = start_low + low + gap + (cut_b - cut_a)
    distance = (start_high + high / 2) - (start_low + low / 2)
    across_low = rng.integers(border, image_size - border - low + 1)
    centre_low = across_low + low / 2
    lowest = max(border, math.ceil(centre_low - OFF_AXIS_RATIO * distance - high / 2))
    highest = min(image_size - border - high, math.floor(centre_low + OFF_AXIS_RATIO * distance - high / 2))
    across_high = rng.integers(lowest, highest + 1)
    vertical = relation in ("above", "below")
    placed = [(start_low, across_low, low), (start_high, across_high, high)]
    placed = [(across, along, side) if vertical else (along, across, side) for along, across, side in placed]
    return placed if first_low else placed[::-1]


def _shape_pixels(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) array: the pixels whose centre lies inside ``shape`` filling a side × side box."""
    centres = np.arange(side) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    half = side / 2
    if shape == "circle":
        return (x - half) ** 2 + (y - half) ** 2 <= half**2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return np.abs(x - half) <= y / 2
    if shape == "cross":
        thickness = CROSS_THICKNESS * side
        return (np.abs(x - half) <= thickness / 2) | (np.abs(y - half) <= thickness / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _phrase(obj: ShapeObject, *, sized: bool) -> str:
    words = f"{obj.size} {obj.name}" if sized else obj.name
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _sentence(first: ShapeObject, relation: str, second: ShapeObject, *, sized: tuple[bool, bool]) -> str:
    return f"{_phrase(first, sized=sized[0])} {relation} {_phrase(second, sized=sized[1])}"


def _check_scene_settings(image_size: int, max_objects: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be at least {MIN_IMAGE_SIZE} to draw two separated objects, got {image_size}"
        )
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")


def _check_settings(format: str, image_size: int, seed: int, max_objects: int, shard_size: int) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    _check_scene_settings(image_size, max_objects)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")


def _split_counts(n_images: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Images per split; val and test get their fraction of ``n_images``, rounded, train the rest."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be non-negative with a sum below 1,"
            f" got {val_fraction} and {test_fraction}"
        )
    val, test = round(n_images * val_fraction), round(n_images * test_fraction)
    counts = {"train": n_images - val - test, "val": val, "test": test}
    empty = [split for split, fraction in (("train", 1), ("val", val_fraction), ("test", test_fraction))
             if fraction > 0 and counts[split] < 1]
    if empty:
        raise ValueError(
            f"n_images={n_images} is too small for the splits: {', '.join(empty)} would get no images"
            f" (val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
    return counts


def _plan(
    rng: np.random.Generator, scenes: list[Scene], counts: dict[str, int], n_duplicates: int, n_mislabeled: int
) -> tuple[list[str], list[int], dict[int, int]]:
    """The split of every image, the originals of the near-duplicates, and each mislabeled image's caption donor."""
    order = rng.permutation(len(scenes))
    splits = [""] * len(scenes)
    labels = ["train"] * counts["train"] + ["val"] * counts["val"] + ["test"] * counts["test"]
    for index, split in zip(order, labels):
        splits[index] = split
    train = [int(index) for index in rng.permutation(order[: counts["train"]])]
    duplicated = sorted(train[:n_duplicates])
    names = [sorted(obj.name for obj in scene.objects) for scene in scenes]
    mislabeled = {}
    for index in sorted(train[n_duplicates : n_duplicates + n_mislabeled]):
        donors = [i for i in train if names[i] != names[index]]
        if not donors:
            raise ValueError(f"no train image differs from {_image_id(index)} to lend it wrong captions")
        mislabeled[index] = donors[rng.integers(len(donors))]
    return splits, duplicated, mislabeled


def _examples(
    seed: int,
    image_size: int,
    scenes: list[Scene],
    captions: list[list[str]],
    splits: list[str],
    duplicated: list[int],
) -> Iterator[_Example]:
    """The images in file order: every generated image, then the near-duplicates."""
    for index, scene in enumerate(scenes):
        image, mask = render_scene(scene, image_size, np.random.default_rng([seed, RENDER, index]))
        yield _Example(_image_id(index), image, mask, scene, captions[index], splits[index])
    for number, index in enumerate(duplicated):
        image, mask = render_scene(scenes[index], image_size, np.random.default_rng([seed, RENDER, index]))
        rng = np.random.default_rng([seed, DUPLICATE, number])
        dx, dy = (int(shift) for shift in rng.integers(-1, 2, size=2))
        pixels = np.roll(np.asarray(image, dtype=np.int16), (dy, dx), axis=(0, 1))
        pixels += rng.integers(-DUPLICATE_NOISE, DUPLICATE_NOISE + 1, size=pixels.shape, dtype=np.int16)
        objects = tuple(_shifted(obj, dx, dy) for obj in scenes[index].objects)
        yield _Example(
            _duplicate_id(number), Image.fromarray(pixels.clip(0, 255).astype(np.uint8)),
            np.roll(mask, (dy, dx), axis=(0, 1)), replace(scenes[index], objects=objects), captions[index], "train",
        )


def _shifted(obj: ShapeObject, dx: int, dy: int) -> ShapeObject:
    x0, y0, x1, y1 = obj.bbox
    return replace(obj, bbox=(x0 + dx, y0 + dy, x1 + dx, y1 + dy), center=(obj.center[0] + dx, obj.center[1] + dy))


def _write_examples(root: Path, format: str, examples: Iterator[_Example], shard_size: int) -> str:
    """Write images, masks, captions and ``objects.jsonl``; return the reader's path relative to ``root``."""
    (root / MASKS).mkdir()
    entries = []
    with (root / OBJECTS).open("w", encoding="utf-8") as objects, ShardWriter(root / SHARDS, shard_size) as shards:
        for example in examples:
            mask_path = f"{MASKS}/{example.id}.png"
            (root / mask_path).write_bytes(_png(Image.fromarray(example.mask)))
            objects.write(json.dumps({"id": example.id, "objects": [obj.to_dict() for obj in example.scene.objects],
                                      "mask": mask_path}) + "\n")
            meta = {"captions": example.captions, "split": example.split, "label": example.scene.label}
            if format == "wds":
                shards.add(example.id, {"png": _png(example.image), "json": (json.dumps(meta) + "\n").encode(),
                                        "txt": example.captions[0].encode()})
            else:
                image_path = f"{IMAGES}/{example.id}.png"
                (root / IMAGES).mkdir(exist_ok=True)
                (root / image_path).write_bytes(_png(example.image))
                entries.append({"id": example.id, "image": image_path, **meta})
    if format == "wds":
        return SHARDS
    if format == "jsonl":
        write_jsonl_lines(root / CAPTIONS_JSONL, entries)
        return CAPTIONS_JSONL
    write_csv_rows(root / CAPTIONS_CSV, entries)
    return CAPTIONS_CSV


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _image_id(index: int) -> str:
    return f"shapes-{index:06d}"


def _duplicate_id(number: int) -> str:
    return f"shapes-dup-{number:06d}"


def _root(path: str | Path) -> Path:
    """The dataset directory holding ``shapes_world.json``: ``path`` itself or its parent."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / METADATA).is_file():
            return candidate
    raise DatasetError(str(path), None, f"not a shapes world: no {METADATA} here or in the parent directory")
