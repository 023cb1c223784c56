"""The shapes world: geometry, masks, captions, planted items, formats and determinism, checked independently."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli.shapes import shapes
from cliptrace.data.record import DatasetError
from cliptrace.data.shapes import (
    COLOR_JITTER,
    COLORS,
    DUPLICATE_NOISE,
    NOISE_AMPLITUDE,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    captions_for,
    generate_shapes_world,
    load_mask,
    load_objects,
    render_scene,
    sample_scene,
)

N_IMAGES, N_DUPLICATES, N_MISLABELED, SHARD_SIZE, SEED = 60, 3, 4, 25, 5
TOLERANCE = COLOR_JITTER + NOISE_AMPLITUDE  # largest per-channel distance of a drawn pixel from its named colour
PHRASE = r"an? (?:(small|large) )?(\w+) (\w+)"
CAPTION = re.compile(rf"^{PHRASE}(?: (above|below|left of|right of) {PHRASE})?$")
AXIS_SIGN = {"above": (1, -1), "below": (1, 1), "left of": (0, -1), "right of": (0, 1)}  # (axis, sign of a - b)


def _generate(directory: Path, data_format: str, **overrides) -> Path:
    settings = dict(n_images=N_IMAGES, seed=SEED, format=data_format, n_duplicates=N_DUPLICATES,
                    n_mislabeled=N_MISLABELED, shard_size=SHARD_SIZE)
    settings.update(overrides)
    return generate_shapes_world(directory, **settings)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same world written in every format: format -> dataset directory."""
    root = tmp_path_factory.mktemp("worlds")
    return {fmt: _generate(root / fmt, fmt).parent for fmt in ("csv", "jsonl", "wds")}


def _read_csv(root: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    with (root / "captions.csv").open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == ["filepath", "title", "split", "label", "id"]
        for row in reader:
            assert row["filepath"] == f"images/{row['id']}.png"
            record = records.setdefault(row["id"], {"captions": [], "split": row["split"], "label": row["label"]})
            assert (record["split"], record["label"]) == (row["split"], row["label"])
            record["captions"].append(row["title"])
    return records


def _read_jsonl(root: Path) -> dict[str, dict]:
    records = {}
    for line in (root / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        assert entry["image"] == f"images/{entry['id']}.png"
        records[entry["id"]] = {key: entry[key] for key in ("captions", "split", "label")}
    return records


def _read_wds(root: Path) -> tuple[dict[str, dict], dict[str, bytes], list[str]]:
    """Records, PNG bytes by id, and the shard names."""
    records, images = {}, {}
    shards = sorted(path.name for path in (root / "shards").iterdir())
    for name in shards:
        with tarfile.open(root / "shards" / name) as tar:
            assert all(member.mtime == 0 and member.isfile() for member in tar.getmembers())  # reproducible headers
            members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        keys = sorted({member.rsplit(".", 1)[0] for member in members})
        assert sorted(members) == sorted(f"{key}.{ext}" for key in keys for ext in ("png", "json", "txt"))
        for key in keys:
            records[key] = json.loads(members[f"{key}.json"])
            assert members[f"{key}.txt"].decode() == records[key]["captions"][0]
            images[key] = members[f"{key}.png"]
    return records, images, shards


def _pixels(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / f"{image_id}.png").convert("RGB"), dtype=np.int16)


def _parse(caption: str) -> tuple[list[tuple[str | None, str, str]], str | None]:
    """(size or None, colour, shape) per named object, and the relation (or None)."""
    match = CAPTION.match(caption)
    assert match, caption
    size_a, color_a, shape_a, relation, size_b, color_b, shape_b = match.groups()
    named = [(size_a, color_a, shape_a)] + ([(size_b, color_b, shape_b)] if relation else [])
    for _, color, shape in named:
        assert color in COLORS and shape in SHAPES, caption
    article = caption.split()[0]
    assert article == ("an" if caption.split()[1][0] in "aeiou" else "a"), caption
    return named, relation


def _names(caption: str) -> list[str]:
    return sorted(f"{color} {shape}" for _, color, shape in _parse(caption)[0])


def _closed_form_area(shape: str, side: float) -> tuple[float, float]:
    """Area and perimeter of a shape filling a side × side box (cross bars one third of the side thick)."""
    bar = side / 3
    return {
        "circle": (math.pi * side**2 / 4, math.pi * side),
        "square": (side**2, 4 * side),
        "triangle": (side**2 / 2, side * (1 + math.sqrt(5))),
        "cross": (2 * side * bar - bar**2, 4 * side),
    }[shape]


def _assert_caption_matches(caption: str, objects: list[dict]) -> None:
    """The caption names exactly these objects, with their sizes, and its relation agrees with their centres."""
    named, relation = _parse(caption)
    by_name = {f"{obj['color']} {obj['shape']}": obj for obj in objects}
    assert sorted(f"{color} {shape}" for _, color, shape in named) == sorted(by_name), caption
    for size, color, shape in named:
        assert size in (None, by_name[f"{color} {shape}"]["size"]), caption
    if relation is None:
        return
    a, b = (by_name[f"{color} {shape}"] for _, color, shape in named)
    axis, sign = AXIS_SIGN[relation]
    along = a["center"][axis] - b["center"][axis]
    across = a["center"][1 - axis] - b["center"][1 - axis]
    assert along * sign > 0 and abs(along) > abs(across), (caption, a, b)
    first, second = (a, b) if sign < 0 else (b, a)  # first lies before second along the axis
    assert second["bbox"][axis] - first["bbox"][axis + 2] >= 2, (caption, a, b)  # boxes apart by a margin


def test_palette_is_separated_beyond_the_noise() -> None:
    colors = np.array(list(COLORS.values()))
    distances = np.abs(colors[:, None] - colors[None]).max(axis=-1)
    assert distances[~np.eye(len(colors), dtype=bool)].min() > 2 * TOLERANCE


def test_masks_match_the_drawn_pixels(worlds: dict[str, Path]) -> None:
    root = worlds["csv"]
    objects = load_objects(root)
    palette = np.array(list(COLORS.values()), dtype=np.int16)
    assert len(objects) == N_IMAGES + N_DUPLICATES
    for image_id, objs in objects.items():
        pixels, mask = _pixels(root, image_id), load_mask(root, image_id)
        tolerance = TOLERANCE + (DUPLICATE_NOISE if "-dup-" in image_id else 0)
        assert mask.dtype == np.uint8 and mask.shape == pixels.shape[:2]
        assert set(np.unique(mask)) <= set(range(len(objs) + 1))
        for k, obj in enumerate(objs, start=1):
            x0, y0, x1, y1 = obj["bbox"]
            inside = mask == k
            assert inside[y0:y1, x0:x1].sum() == inside.sum() > 0, image_id  # the mask lies in the bounding box
            deviation = np.abs(pixels[inside] - np.array(COLORS[obj["color"]])).max()
            assert deviation <= tolerance, (image_id, obj)
            area, perimeter = _closed_form_area(obj["shape"], x1 - x0)
            assert abs(inside.sum() - area) <= perimeter / 2, (image_id, obj)
        background = pixels[mask == 0]
        nearest = np.abs(background[:, None] - palette[None]).max(axis=-1).min()
        assert nearest > tolerance, image_id  # no pixel of any object colour outside the masks


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_area_matches_the_closed_form(shape: str) -> None:
    rng = np.random.default_rng(0)
    for side in range(5, 41):
        obj = ShapeObject(shape, "red", "large", (3, 4, 3 + side, 4 + side), (3 + side / 2, 4 + side / 2))
        _, mask = render_scene(Scene((obj,)), 48, rng)
        area, perimeter = _closed_form_area(shape, side)
        # Sampling at pixel centres misjudges only pixels that the outline crosses: well under half a pixel per
        # unit of outline.
        assert abs((mask == 1).sum() - area) <= perimeter / 2, side


@pytest.mark.parametrize("image_size", [32, 64, 97])
def test_sampled_scenes_are_separated_and_captioned_consistently(image_size: int) -> None:
    rng = np.random.default_rng(image_size)
    scenes = [sample_scene(rng, image_size=image_size) for _ in range(400)]
    singles = sum(len(scene.objects) == 1 for scene in scenes)
    assert 0.25 < singles / len(scenes) < 0.42  # about a third single-object
    assert {scene.relation for scene in scenes} == {None, *RELATIONS}
    sides = {size: [obj.bbox[2] - obj.bbox[0] for s in scenes for obj in s.objects if obj.size == size]
             for size in SIZES}
    assert max(sides["small"]) < min(sides["large"])  # the size words are visible
    for scene in scenes:
        objects = [obj.to_dict() for obj in scene.objects]
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 < x0 < x1 < image_size and 0 < y0 < y1 < image_size and x1 - x0 == y1 - y0
            assert obj["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
        assert len({(obj["color"], obj["shape"]) for obj in objects}) == len(objects)
        captions = captions_for(scene, rng)
        assert 2 <= len(captions) == len(set(captions)) <= 3
        for caption in captions:
            _assert_caption_matches(caption, objects)
        if len(objects) == 2:  # the relation is read both ways
            assert {_parse(caption)[0][0][1:] for caption in captions} == {(o["color"], o["shape"]) for o in objects}


def test_max_objects_one_gives_single_object_scenes() -> None:
    rng = np.random.default_rng(1)
    assert all(len(sample_scene(rng, image_size=64, max_objects=1).objects) == 1 for _ in range(50))


def test_written_captions_labels_and_splits(worlds: dict[str, Path]) -> None:
    root = worlds["csv"]
    records, objects = _read_csv(root), load_objects(root)
    planted = json.loads((root / "planted.json").read_text())
    mislabeled = {entry["id"] for entry in planted["mislabeled"]}
    assert list(records) == [f"shapes-{i:06d}" for i in range(N_IMAGES)] + [
        f"shapes-dup-{i:06d}" for i in range(N_DUPLICATES)
    ]
    for image_id, record in records.items():
        objs = objects[image_id]
        assert record["label"] == (f"{objs[0]['color']} {objs[0]['shape']}" if len(objs) == 1 else "")
        assert 2 <= len(record["captions"]) == len(set(record["captions"])) <= 3
        if image_id not in mislabeled:
            for caption in record["captions"]:
                _assert_caption_matches(caption, objs)

    splits = [record["split"] for record in records.values()]
    expected = {"train": N_IMAGES - 2 * round(0.1 * N_IMAGES) + N_DUPLICATES, "val": 6, "test": 6}
    assert {split: splits.count(split) for split in expected} == expected
    metadata = json.loads((root / "shapes_world.json").read_text())
    assert metadata["counts"] == expected and metadata["format"] == "csv" and metadata["data"] == "captions.csv"
    assert metadata["classes"] == [f"{color} {shape}" for color in COLORS for shape in SHAPES]
    assert metadata["settings"]["seed"] == SEED and isinstance(metadata["format_version"], int)


def test_planted_duplicates_and_mislabeled_captions(worlds: dict[str, Path]) -> None:
    root = worlds["csv"]
    records, objects = _read_csv(root), load_objects(root)
    planted = json.loads((root / "planted.json").read_text())
    assert len(planted["duplicates"]) == N_DUPLICATES and len(planted["mislabeled"]) == N_MISLABELED

    for pair in planted["duplicates"]:
        original, duplicate = pair["original"], pair["duplicate"]
        assert records[original]["split"] == records[duplicate]["split"] == "train"
        assert records[duplicate]["captions"] == records[original]["captions"]
        a, b = _pixels(root, original), _pixels(root, duplicate)
        mask_a, mask_b = load_mask(root, original), load_mask(root, duplicate)
        end = a.shape[0] - 1  # compare the interior, where every shift of at most one pixel stays in the image
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if np.abs(b[1 + dy : end + dy, 1 + dx : end + dx] - a[1:end, 1:end]).max() <= DUPLICATE_NOISE
            and np.array_equal(mask_b[1 + dy : end + dy, 1 + dx : end + dx], mask_a[1:end, 1:end])
        ]
        assert matches, pair  # the same picture, shifted by at most one pixel, with a little noise
        assert not np.array_equal(a, b)

    duplicated = {pair["original"] for pair in planted["duplicates"]}
    for entry in planted["mislabeled"]:
        image_id = entry["id"]
        assert records[image_id]["split"] == "train" and image_id not in duplicated
        assert records[image_id]["captions"] == entry["captions"]
        true_names = sorted(f"{obj['color']} {obj['shape']}" for obj in objects[image_id])
        for caption in entry["true_captions"]:
            _assert_caption_matches(caption, objects[image_id])
        shown = {tuple(_names(caption)) for caption in entry["captions"]}
        assert len(shown) == 1 and list(shown.pop()) != true_names  # a coherent caption set of another scene


def test_formats_agree(worlds: dict[str, Path]) -> None:
    from_csv, from_jsonl = _read_csv(worlds["csv"]), _read_jsonl(worlds["jsonl"])
    from_wds, images, shards = _read_wds(worlds["wds"])
    assert from_csv == from_jsonl
    assert list(from_wds) == list(from_csv) and from_wds == from_csv
    assert shards == [f"shard-{i:06d}.tar" for i in range(math.ceil((N_IMAGES + N_DUPLICATES) / SHARD_SIZE))]
    assert not (worlds["wds"] / "images").exists()
    for image_id, png in images.items():
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
        assert np.array_equal(pixels, _pixels(worlds["csv"], image_id))
    for fmt in ("jsonl", "wds"):
        assert (worlds[fmt] / "objects.jsonl").read_bytes() == (worlds["csv"] / "objects.jsonl").read_bytes()
        assert (worlds[fmt] / "planted.json").read_bytes() == (worlds["csv"] / "planted.json").read_bytes()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("data_format", ["csv", "wds"])
def test_same_seed_gives_identical_files(data_format: str, tmp_path: Path) -> None:
    first = _generate(tmp_path / "a", data_format, n_images=20)
    second = _generate(tmp_path / "b", data_format, n_images=20)
    other = _generate(tmp_path / "c", data_format, n_images=20, seed=SEED + 1)
    assert first.name == second.name == other.name
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    differing = [name for name, data in _tree(tmp_path / "c").items() if _tree(tmp_path / "a").get(name) != data]
    assert any(name.startswith("masks/") for name in differing)


def test_an_image_does_not_depend_on_the_other_settings(tmp_path: Path) -> None:
    small = _generate(tmp_path / "small", "csv", n_images=20, n_duplicates=0, n_mislabeled=0).parent
    large = _generate(tmp_path / "large", "csv", n_images=40, val_fraction=0.3).parent
    for index in range(20):
        name = f"shapes-{index:06d}.png"
        assert (small / "images" / name).read_bytes() == (large / "images" / name).read_bytes()
        assert (small / "masks" / name).read_bytes() == (large / "masks" / name).read_bytes()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_images": 4}, "too small for the splits"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "sum below 1"),
        ({"format": "parquet"}, "unknown format"),
        ({"n_duplicates": 40, "n_mislabeled": 10}, "exceed the 48 train images"),
        ({"n_mislabeled": -1}, "non-negative"),
        ({"image_size": 24}, "image_size must be at least 32"),
        ({"max_objects": 3}, "max_objects"),
        ({"shard_size": 0}, "shard_size"),
        ({"seed": -1}, "seed must be non-negative"),
    ],
)
def test_bad_arguments_are_refused(overrides: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        _generate(tmp_path / "out", "csv", **overrides)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_directory_and_reports_missing_files(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="taken"):
        _generate(tmp_path / "taken", "csv", n_images=20)
    data = _generate(tmp_path / "world", "csv", n_images=20, n_duplicates=0, n_mislabeled=0)
    assert np.array_equal(load_mask(data, "shapes-000001"), load_mask(data.parent, "shapes-000001"))
    with pytest.raises(DatasetError, match="shapes-999999"):
        load_mask(data, "shapes-999999")
    with pytest.raises(DatasetError, match="shapes_world.json"):
        load_objects(tmp_path / "taken")
    with (data.parent / "objects.jsonl").open("a") as file:
        file.write("{not json\n")
    with pytest.raises(DatasetError, match="objects.jsonl, line 21"):
        load_objects(data)


def test_cli_writes_the_world_and_reports_errors(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(shapes)
    out = tmp_path / "cli"
    args = [str(out), "--n-images", "30", "--seed", "2", "--format", "jsonl", "--duplicates", "2", "--mislabeled", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output = result.output.replace("\n", "")
    assert str(out) in output and "train: 26" in output and "val: 3" in output and "test: 3" in output
    assert _read_jsonl(out) == _read_jsonl(_generate(tmp_path / "api", "jsonl", n_images=30, seed=2,
                                                     n_duplicates=2, n_mislabeled=1).parent)
    failed = CliRunner().invoke(app, [str(tmp_path / "bad"), "--format", "parquet"])
    assert failed.exit_code == 1 and "unknown format" in failed.output
