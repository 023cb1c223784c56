"""Dataset readers: records match what the test wrote; every kind of broken row is named by file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cliptrace.data.readers import (
    load_records,
    read_coco,
    read_csv,
    read_image_folder,
    read_jsonl,
    read_karpathy,
    read_webdataset,
    select_split,
)
from cliptrace.data.record import DatasetError, Record

UNICODE_CAPTIONS = ("赤い丸と青い四角", "دائرة حمراء فوق مربع أزرق", "a red circle 🔴 above 🟦", "line\u2028separator")


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as file:
        csv.writer(file, delimiter=delimiter).writerows(rows)
    return path


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    text = [line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def collect(reader, *args, **kwargs) -> tuple[list[Record], list[DatasetError]]:
    """Records and every reported error, reading with ``on_error``."""
    errors: list[DatasetError] = []
    records = reader(*args, on_error=errors.append, **kwargs)
    return records, errors


# ----------------------------------------------------------------------------------------------------------- CSV


def test_csv_groups_rows_per_image_and_uses_optional_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", [
        ["filepath", "title", "split", "label", "id"],
        ["images/a.png", "a red circle", "train", "red circle", "A"],
        ["images/b.png", "a blue square", "val", "", "B"],
        ["images/a.png", "  the red circle  ", "train", "red circle", "A"],
        ["images/c.png", "three, with a comma and \"quotes\"", "", "", ""],
    ])
    records = read_csv(path)
    assert records == [
        Record("A", str(tmp_path / "images/a.png"), ("a red circle", "the red circle"), "train", "red circle"),
        Record("B", str(tmp_path / "images/b.png"), ("a blue square",), "val", None),
        Record("images/c", str(tmp_path / "images/c.png"), ('three, with a comma and "quotes"',), "train", None),
    ]


def test_tsv_with_bom_several_caption_columns_and_image_root(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    path = write_csv(tmp_path / "meta" / "data.tsv", [
        ["file", "first", "second"],
        ["x/one.jpg", "caption one", "caption, two"],
        ["two.jpg", "caption three", "caption four"],
    ], delimiter="\t", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    root = tmp_path / "pictures"
    records = read_csv(path, image_key="file", caption_key=["first", "second"], image_root=root, default_split="test")
    assert records == [
        Record("x/one", str(root / "x/one.jpg"), ("caption one", "caption, two"), "test"),
        Record("two", str(root / "two.jpg"), ("caption three", "caption four"), "test"),
    ]


def test_csv_explicit_separator(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.txt", [["filepath", "title"], ["a.png", "a, b"]], delimiter=";")
    assert read_csv(path, sep=";") == [Record("a", str(tmp_path / "a.png"), ("a, b",))]


def test_csv_line_numbers_count_the_header_and_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        'filepath,title,id\n'           # line 1
        'a.png,"two\nlines",A\n'        # lines 2-3
        '\n'                            # line 4 (blank, skipped)
        'b.png,   ,B\n'                 # line 5: whitespace-only caption
        'c.png,fine,C\n'                # line 6
        'd.png,short\n'                 # line 7: missing field
        ',no image,E\n'                 # line 8: empty image
        'f.png,conflict,A\n'            # line 9: id A already has a.png
        'c.png,other id,G\n',           # line 10: c.png already belongs to C
        encoding="utf-8",
    )
    records, errors = collect(read_csv, path)
    assert [record.id for record in records] == ["A", "C"]
    assert records[0].captions == ("two\nlines",)
    assert [error.location for error in errors] == ["line 5", "line 7", "line 8", "line 9", "line 10"]
    assert all(error.source == str(path) for error in errors)
    assert "empty caption" in errors[0].problem
    assert "2 fields" in errors[1].problem and "header has 3" in errors[1].problem
    assert "empty 'filepath'" in errors[2].problem
    assert "'A' already has image" in errors[3].problem
    assert "already belongs to id 'C'" in errors[4].problem
    with pytest.raises(DatasetError, match=rf"^{path}, line 5: empty caption"):
        read_csv(path)


def test_csv_conflicting_split_of_one_image_is_broken(tmp_path: Path) -> None:
    rows = [["filepath", "title", "split"], ["a.png", "one", "train"], ["a.png", "two", "val"]]
    path = write_csv(tmp_path / "d.csv", rows)
    records, errors = collect(read_csv, path)
    assert records == [Record("a", str(tmp_path / "a.png"), ("one",), "train")]
    assert [error.location for error in errors] == ["line 3"] and "split 'train', not 'val'" in errors[0].problem


def test_csv_missing_column_names_file_and_header(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["filepath", "caption"], ["a.png", "x"]])
    with pytest.raises(DatasetError, match=r"d\.csv, line 1: missing column\(s\) \['title'\]"):
        read_csv(path, on_error=lambda error: None)
    semicolons = write_csv(tmp_path / "s.csv", [["filepath", "title"], ["a.png", "x"]], delimiter=";")
    with pytest.raises(DatasetError, match="separator"):
        read_csv(semicolons)


def test_csv_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("filepath,title\na.png,ok\nb.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.csv, line 3: not UTF-8"):
        read_csv(path)


def test_missing_file_and_bad_options_are_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.csv: file not found"):
        read_csv(tmp_path / "nope.csv")
    path = write_csv(tmp_path / "d.csv", [["filepath", "title"], ["a.png", "x"]])
    with pytest.raises(DatasetError, match=r"d\.csv: the separator must be one character, not '::'"):
        read_csv(path, sep="::")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "caption": "x"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl: caption_key must be one key"):
        read_jsonl(jsonl, caption_key=["a", "b"])


# --------------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_keys_blank_lines_and_merging(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "a.png", "caption": "one", "id": 7, "split": "val", "label": "cat"},
        "",
        {"file_name": "sub/b.png", "captions": ["two", "three"]},
        {"filepath": "c.png", "caption": "four", "label": 3},
        {"image": "a.png", "captions": ["five"], "id": "7", "split": "val", "label": "cat"},
    ])
    assert read_jsonl(path) == [
        Record("7", str(tmp_path / "a.png"), ("one", "five"), "val", "cat"),
        Record("sub/b", str(tmp_path / "sub/b.png"), ("two", "three"), "train", None),
        Record("c", str(tmp_path / "c.png"), ("four",), "train", "3"),
    ]


def test_jsonl_custom_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"path": "a.png", "alt": "one", "text": "ignored"}])
    assert read_jsonl(path, image_key="path", caption_key="alt") == [Record("a", str(tmp_path / "a.png"), ("one",))]


def test_jsonl_broken_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "ok.png", "caption": "fine", "id": "ok"},  # 1
        "{not json",                                       # 2
        "",                                                # 3
        {"caption": "no image"},                           # 4
        {"image": "x.png"},                                # 5
        {"image": "y.png", "captions": ["good", " "]},     # 6
        "[1, 2]",                                          # 7
        {"image": "z.png", "caption": "x", "id": "ok"},    # 8
        {"image": "w.png", "captions": []},                # 9
    ])
    records, errors = collect(read_jsonl, path)
    assert records == [Record("ok", str(tmp_path / "ok.png"), ("fine",))]
    assert [error.location for error in errors] == [f"line {n}" for n in (2, 4, 5, 6, 7, 8, 9)]
    problems = [error.problem for error in errors]
    assert "invalid JSON" in problems[0]
    assert "missing key 'image'" in problems[1]
    assert "missing key 'captions' / 'caption' / 'text'" in problems[2]
    assert "empty caption" in problems[3]
    assert "expected a JSON object" in problems[4]
    assert "already has image" in problems[5]
    assert "non-empty list" in problems[6]
    with pytest.raises(DatasetError, match=r"d\.jsonl, line 2: invalid JSON"):
        read_jsonl(path)


# ---------------------------------------------------------------------------------------------------------- COCO


def coco(images: list, annotations: list) -> dict:
    return {"info": {}, "images": images, "annotations": annotations}


def test_coco_joins_captions_and_infers_split(tmp_path: Path) -> None:
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco(
        [{"id": 42, "file_name": "000042.jpg"}, {"id": 7, "file_name": "000007.jpg"}],
        [{"image_id": 7, "id": 1, "caption": "b first"}, {"image_id": 42, "id": 2, "caption": "a only\n"},
         {"image_id": 7, "id": 3, "caption": "b second"}],
    )))
    root = tmp_path / "val2017"
    expected = [
        Record("42", str(root / "000042.jpg"), ("a only",), "val"),
        Record("7", str(root / "000007.jpg"), ("b first", "b second"), "val"),
    ]
    assert read_coco(path, image_root=root) == expected
    assert [record.split for record in read_coco(path, default_split="test")] == ["test", "test"]
    beside = path.parent
    assert [record.image for record in read_coco(path)] == [str(beside / "000042.jpg"), str(beside / "000007.jpg")]


@pytest.mark.parametrize(
    ("name", "split"),
    [("captions_train2014.json", "train"), ("captions_val2017.json", "val"), ("image_info_test2015.json", "test"),
     ("my_captions.json", "train")],
)
def test_coco_split_from_file_name(tmp_path: Path, name: str, split: str) -> None:
    path = tmp_path / name
    path.write_text(json.dumps(coco([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": "c"}])))
    assert read_coco(path)[0].split == split


def test_coco_broken_entries(tmp_path: Path) -> None:
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(coco(
        [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3}, {"id": 1, "file_name": "z.jpg"}],
        [{"image_id": 1, "caption": "fine"}, {"image_id": 99, "caption": "orphan"}, {"image_id": 1, "caption": ""},
         {"caption": "no image id"}, {"image_id": 3, "caption": "image 3 has no file"},
         {"image_id": 99, "caption": "second orphan"}],
    )))
    records, errors = collect(read_coco, path)
    assert records == [Record("1", str(tmp_path / "a.jpg"), ("fine",), "train")]
    assert all(error.source == str(path) for error in errors)
    assert [error.location for error in errors] == [
        "annotations[2]", "annotations[3]", "images[1]", "images[2]", "images[3]", "annotations[1]", "annotations[5]"
    ]
    problems = [error.problem for error in errors]
    assert "empty caption" in problems[0]
    assert "missing key 'image_id'" in problems[1]
    assert "image 2 has no caption" in problems[2]
    assert "missing key 'file_name'" in problems[3]
    assert "duplicate image id 1" in problems[4]
    assert "unknown image_id 99" in problems[5] and "unknown image_id 99" in problems[6]
    with pytest.raises(DatasetError, match=r"captions_train2017\.json, annotations\[2\]: empty caption"):
        read_coco(path)


def test_invalid_json_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "captions_val.json"
    path.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"captions_val\.json, line 2: invalid JSON"):
        read_coco(path)


# ------------------------------------------------------------------------------------------------------ Karpathy


def test_karpathy_coco_layout_with_restval(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "x.jpg", "imgid": 0, "cocoid": 391895, "split": "test",
         "sentences": [{"raw": "first.", "tokens": ["first"]}, {"raw": "second."}]},
        {"filepath": "train2014", "filename": "y.jpg", "imgid": 1, "cocoid": 5, "split": "restval",
         "sentences": [{"raw": "third."}]},
    ]}))
    root = tmp_path / "coco"
    assert read_karpathy(path, image_root=root) == [
        Record("391895", str(root / "val2014/x.jpg"), ("first.", "second."), "test"),
        Record("5", str(root / "train2014/y.jpg"), ("third.",), "train"),
    ]
    assert read_karpathy(path, restval_as="restval")[1].split == "restval"


def test_karpathy_flickr_layout_and_broken_entries(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "Two men."}]},
        {"filename": "b.jpg", "imgid": 1, "split": "val", "sentences": []},
        {"imgid": 2, "split": "val", "sentences": [{"raw": "no file"}]},
        {"filename": "c.jpg", "imgid": 3, "split": "val", "sentences": [{"tokens": ["no", "raw"]}]},
        {"filename": "d.jpg", "imgid": 0, "split": "val", "sentences": [{"raw": "duplicate id"}]},
    ]}))
    records, errors = collect(read_karpathy, path)
    assert records == [Record("0", str(tmp_path / "1000092795.jpg"), ("Two men.",), "train")]
    assert [error.location for error in errors] == ["images[1]", "images[2]", "images[3]", "images[4]"]
    assert "no caption" in errors[0].problem
    assert "missing key 'filename'" in errors[1].problem
    assert "missing key 'raw'" in errors[2].problem
    assert "duplicate imgid 0" in errors[3].problem


# --------------------------------------------------------------------------------------------------- WebDataset


def test_webdataset_groups_members_by_key(tmp_path: Path, write_tar, image_bytes) -> None:
    shard0 = write_tar(tmp_path / "shards" / "shard-000000.tar", {
        "k1.png": image_bytes(),
        "k1.json": json.dumps({"captions": ["one", "two"], "split": "val", "label": "red circle"}).encode(),
        "k1.txt": b"ignored: the json has captions",
        "k2.txt": "  three\n".encode(),
        "k2.jpg": image_bytes(format="JPEG"),
        "sub/k3.seg.png": image_bytes(),
        "sub/k3.webp": image_bytes(format="WEBP"),
        "sub/k3.json": json.dumps({"caption": "four", "id": "custom", "label": ""}).encode(),
    })
    shard1 = write_tar(tmp_path / "shards" / "shard-000001.tar", {
        "k4.jpeg": image_bytes(), "k4.json": json.dumps({"text": "five", "split": "test"}).encode(),
    })
    expected = [
        Record("k1", f"{shard0}::k1.png", ("one", "two"), "val", "red circle"),
        Record("k2", f"{shard0}::k2.jpg", ("three",), "train"),
        Record("custom", f"{shard0}::sub/k3.webp", ("four",), "train"),
        Record("k4", f"{shard1}::k4.jpeg", ("five",), "test"),
    ]
    assert read_webdataset(tmp_path / "shards") == expected
    assert read_webdataset(f"{tmp_path}/shards/shard-*.tar") == expected
    assert read_webdataset(shard0) == expected[:3]
    assert read_webdataset(shard1, default_split="val")[0].split == "test"


def test_webdataset_broken_samples_name_shard_and_key(tmp_path: Path, write_tar, image_bytes) -> None:
    shard = write_tar(tmp_path / "s.tar", {
        "good.png": image_bytes(), "good.txt": b"fine",
        "noimage.txt": b"caption without image",
        "nocaption.png": image_bytes(),
        "badjson.png": image_bytes(), "badjson.json": b"{oops",
        "empty.png": image_bytes(), "empty.txt": b"  \n",
        "two.png": image_bytes(), "two.jpg": image_bytes(format="JPEG"), "two.txt": b"x",
    })
    records, errors = collect(read_webdataset, shard)
    assert records == [Record("good", f"{shard}::good.png", ("fine",))]
    assert [(error.source, error.location) for error in errors] == [
        (str(shard), f"key {key}") for key in ("noimage", "nocaption", "badjson", "empty", "two")
    ]
    assert "no image" in errors[0].problem
    assert "no caption" in errors[1].problem
    assert "invalid JSON in badjson.json" in errors[2].problem
    assert "empty caption" in errors[3].problem
    assert "several images" in errors[4].problem
    with pytest.raises(DatasetError, match=r"s\.tar, key noimage: no image"):
        read_webdataset(shard)


def test_webdataset_without_shards_or_with_a_bad_shard(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no .tar shards found"):
        read_webdataset(f"{tmp_path}/*.tar")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DatasetError, match=r"bad\.tar: not a readable uncompressed tar file"):
        read_webdataset(bad)


# ---------------------------------------------------------------------------------------------- image folder


def test_image_folder_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl_dir = tmp_path / "j"
    jsonl_dir.mkdir()
    write_jsonl(jsonl_dir / "metadata.jsonl", [
        {"file_name": "a.png", "text": "one"}, {"file_name": "b.png", "text": "two"}
    ])
    assert read_image_folder(jsonl_dir) == [
        Record("a", str(jsonl_dir / "a.png"), ("one",)), Record("b", str(jsonl_dir / "b.png"), ("two",))
    ]
    csv_dir = tmp_path / "c"
    csv_dir.mkdir()
    write_csv(csv_dir / "metadata.csv", [["file_name", "caption", "split"], ["a.png", "one", "val"]])
    assert read_image_folder(csv_dir) == [Record("a", str(csv_dir / "a.png"), ("one",), "val")]
    with pytest.raises(DatasetError, match="has no metadata.jsonl or metadata.csv"):
        read_image_folder(tmp_path)


# ------------------------------------------------------------------------------------------------ load_records


@pytest.fixture
def layouts(tmp_path: Path, write_tar, image_bytes) -> dict[str, tuple[Path, list[Record]]]:
    """One small dataset per layout: name -> (path given to load_records, expected records)."""
    result = {}
    csv_path = write_csv(tmp_path / "plain.csv", [["filepath", "title"], ["a.png", "csv caption"]])
    result["csv"] = (csv_path, [Record("a", str(tmp_path / "a.png"), ("csv caption",))])
    tsv_path = write_csv(tmp_path / "plain.tsv", [["filepath", "title"], ["a.png", "tsv, caption"]], delimiter="\t")
    result["tsv"] = (tsv_path, [Record("a", str(tmp_path / "a.png"), ("tsv, caption",))])
    jsonl_path = write_jsonl(tmp_path / "plain.jsonl", [{"image": "a.png", "caption": "jsonl caption"}])
    result["jsonl"] = (jsonl_path, [Record("a", str(tmp_path / "a.png"), ("jsonl caption",))])
    coco_path = tmp_path / "captions_val2014.json"
    coco_path.write_text(json.dumps(coco([{"id": 3, "file_name": "a.png"}], [{"image_id": 3, "caption": "coco"}])))
    result["coco"] = (coco_path, [Record("3", str(tmp_path / "a.png"), ("coco",), "val")])
    karpathy_path = tmp_path / "dataset_flickr8k.json"
    karpathy_path.write_text(json.dumps({"images": [
        {"filename": "a.png", "imgid": 4, "split": "test", "sentences": [{"raw": "karpathy"}]}]}))
    result["karpathy"] = (karpathy_path, [Record("4", str(tmp_path / "a.png"), ("karpathy",), "test")])
    shard = write_tar(tmp_path / "wds" / "shard-0.tar", {"k.png": image_bytes(), "k.txt": b"tar caption"})
    wds_records = [Record("k", f"{shard}::k.png", ("tar caption",))]
    result["tar"] = (shard, wds_records)
    result["tar directory"] = (shard.parent, wds_records)
    result["tar glob"] = (tmp_path / "wds" / "*.tar", wds_records)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "text": "folder caption"}])
    result["image folder"] = (folder, [Record("a", str(folder / "a.png"), ("folder caption",))])
    return result


@pytest.mark.parametrize("layout", ["csv", "tsv", "jsonl", "coco", "karpathy", "tar", "tar directory", "tar glob",
                                    "image folder"])
def test_load_records_detects_the_format(layouts: dict, layout: str) -> None:
    path, expected = layouts[layout]
    assert load_records(path) == expected


@pytest.mark.parametrize(
    ("layout", "format"),
    [("csv", "csv"), ("jsonl", "jsonl"), ("coco", "coco"), ("karpathy", "karpathy"), ("tar", "webdataset"),
     ("image folder", "imagefolder")],
)
def test_load_records_forced_format(layouts: dict, layout: str, format: str) -> None:
    path, expected = layouts[layout]
    assert load_records(path, format=format) == expected


def test_load_records_passes_options_and_rejects_unknown_ones(layouts: dict, tmp_path: Path) -> None:
    path, _ = layouts["coco"]
    assert load_records(path, image_root=tmp_path / "imgs")[0].image == str(tmp_path / "imgs" / "a.png")
    errors: list[DatasetError] = []
    assert load_records(layouts["csv"][0], on_error=errors.append, caption_key="title") == layouts["csv"][1]
    with pytest.raises(DatasetError, match=r"the coco reader takes no option \['sep'\]"):
        load_records(path, sep=";")


def test_load_records_unknown_inputs(tmp_path: Path) -> None:
    other = tmp_path / "data.xlsx"
    other.write_bytes(b"PK")
    with pytest.raises(DatasetError, match=r"data\.xlsx: cannot tell the dataset format; supported: CSV/TSV"):
        load_records(other)
    with pytest.raises(DatasetError, match="unknown format 'xlsx'; choose one of csv, jsonl"):
        load_records(other, format="xlsx")
    with pytest.raises(DatasetError, match="no such file or directory"):
        load_records(tmp_path / "missing")
    with pytest.raises(DatasetError, match="holds no dataset"):
        load_records(tmp_path)
    neither = tmp_path / "other.json"
    neither.write_text(json.dumps({"images": [{"file_name": "a.png"}]}))
    with pytest.raises(DatasetError, match="neither COCO captions"):
        load_records(neither)


def test_shapes_world_layouts(tmp_path: Path, write_image, write_tar, image_bytes) -> None:
    """A directory with captions.csv, captions.jsonl or shards/*.tar, as the shapes world writes it."""
    expected_rows = [("shapes-000000", ("a red circle", "a circle"), "train", "red circle"),
                     ("shapes-000001", ("a red circle left of a blue square",), "test", None)]
    csv_dir, jsonl_dir, wds_dir = tmp_path / "csv", tmp_path / "jsonl", tmp_path / "wds"
    for folder in (csv_dir, jsonl_dir):
        for record_id, *_ in expected_rows:
            write_image(folder / "images" / f"{record_id}.png")
    write_csv(csv_dir / "captions.csv", [["filepath", "title", "split", "label", "id"]] + [
        [f"images/{record_id}.png", caption, split, label or "", record_id]
        for record_id, captions, split, label in expected_rows for caption in captions
    ])
    write_jsonl(jsonl_dir / "captions.jsonl", [
        {"id": record_id, "image": f"images/{record_id}.png", "captions": list(captions), "split": split,
         "label": label or ""}
        for record_id, captions, split, label in expected_rows
    ])
    members = {}
    for record_id, captions, split, label in expected_rows:
        members[f"{record_id}.png"] = image_bytes()
        meta = {"captions": list(captions), "split": split, "label": label or ""}
        members[f"{record_id}.json"] = json.dumps(meta).encode()
        members[f"{record_id}.txt"] = captions[0].encode()
    shard = write_tar(wds_dir / "shards" / "shard-000000.tar", members)
    (wds_dir / "shapes_world.json").write_text("{}")
    for folder in (csv_dir, jsonl_dir):
        assert load_records(folder) == [
            Record(record_id, str(folder / "images" / f"{record_id}.png"), captions, split, label)
            for record_id, captions, split, label in expected_rows
        ]
    assert load_records(wds_dir) == [
        Record(record_id, f"{shard}::{record_id}.png", captions, split, label)
        for record_id, captions, split, label in expected_rows
    ]
    write_jsonl(csv_dir / "captions.jsonl", [])
    with pytest.raises(DatasetError, match="holds several datasets"):
        load_records(csv_dir)
    assert load_records(csv_dir, format="csv") == load_records(csv_dir / "captions.csv")
    assert load_records(csv_dir, format="jsonl") == []


# ------------------------------------------------------------------------------------------------------ unicode


def test_unicode_captions_survive_every_text_format(tmp_path: Path, write_tar) -> None:
    rows = [["filepath", "title"], *([f"{i}.png", text] for i, text in enumerate(UNICODE_CAPTIONS))]
    write_csv(tmp_path / "u.csv", rows)
    write_jsonl(tmp_path / "u.jsonl", [{"image": "0.png", "captions": list(UNICODE_CAPTIONS)}])
    shard = write_tar(tmp_path / "u.tar", {
        "0.png": b"", "0.json": json.dumps({"captions": list(UNICODE_CAPTIONS)}).encode(),
        "1.png": b"", "1.txt": UNICODE_CAPTIONS[1].encode(),
    })
    assert [record.captions[0] for record in load_records(tmp_path / "u.csv")] == list(UNICODE_CAPTIONS)
    assert load_records(tmp_path / "u.jsonl")[0].captions == UNICODE_CAPTIONS
    assert [record.captions for record in load_records(shard)] == [UNICODE_CAPTIONS, (UNICODE_CAPTIONS[1],)]


def test_select_split() -> None:
    records = [Record("a", "a.png", ("x",), "train"), Record("b", "b.png", ("y",), "val"), Record("c", "c.png", ("z",))]
    assert select_split(records, "train") == [records[0], records[2]]
    assert select_split(records, "val") == [records[1]]
    assert select_split(records, "test") == []
    assert select_split(records, None) == records
