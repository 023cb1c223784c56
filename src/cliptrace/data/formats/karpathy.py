"""The karpathy format: Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``, ...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cliptrace.data.formats.format import Format, Probe
from cliptrace.data.formats.rows import (
    Broken,
    OnError,
    RecordSet,
    as_object,
    caption,
    id_field,
    image_path,
    json_list,
    optional_text,
    report,
    require,
    root_of,
)
from cliptrace.data.formats.text import load_json
from cliptrace.data.record import DatasetError, Record


def _karpathy_records(
    data: Any,
    path: Path,
    *,
    image_root: str | Path | None = None,
    restval_as: str = "train",
    on_error: OnError = None,
) -> list[Record]:
    """Records of a parsed Karpathy split file read from ``path``."""
    source = str(path)
    root = root_of(path, image_root)
    records = RecordSet()
    for index, entry in enumerate(json_list(data, "images", source, "Karpathy")):
        try:
            entry = as_object(entry)
            id_key = "cocoid" if entry.get("cocoid") is not None else "imgid"
            image_id = str(id_field(entry, id_key))
            if image_id in records:
                raise Broken(f"duplicate {id_key} {image_id}")
            filename = require(entry, "filename")
            if not isinstance(filename, str) or not filename.strip():
                raise Broken("'filename' must be a non-empty string")
            folder = optional_text(entry.get("filepath"), "filepath") or ""
            image = image_path(os.path.join(folder, filename), root, "filename")
            sentences = require(entry, "sentences")
            if not isinstance(sentences, list) or not sentences:
                raise Broken("no caption ('sentences' is empty)")
            captions = [caption(require(as_object(sentence), "raw"), "raw") for sentence in sentences]
            split = optional_text(entry.get("split"), "split") or "train"
            records.add(image_id, image, captions, restval_as if split == "restval" else split, None)
        except Broken as broken:
            report(DatasetError(source, f"images[{index}]", str(broken)), on_error)
    return records.records()


def read_karpathy(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    restval_as: str = "train",
    on_error: OnError = None,
) -> list[Record]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    Each ``images`` entry gives ``filename`` (under ``filepath`` when present), ``sentences`` [{raw}], ``split``
    and the id ``cocoid`` (or ``imgid`` when there is none). The image is ``image_root/filepath/filename``: for the
    COCO file (``filepath`` ``train2014`` or ``val2014``) ``image_root`` is the folder holding ``train2014/`` and
    ``val2014/``, wherever the JSON file is kept.

    Args:
        path: The JSON file.
        image_root: Directory ``filepath/filename`` is relative to; the file's directory when None.
        restval_as: Split given to ``restval`` entries.
        on_error: Receives each broken entry (location ``images[i]``), which is then skipped; when None the first
            one raises.
    """
    path = Path(path)
    return _karpathy_records(load_json(path), path, image_root=image_root, restval_as=restval_as, on_error=on_error)


def _read_probe(
    probe: Probe, *, image_root: str | Path | None = None, restval_as: str = "train", on_error: OnError = None
) -> list[Record]:
    """The records of a probed Karpathy file, its JSON parsed once."""
    return _karpathy_records(probe.json(), probe.path, image_root=image_root, restval_as=restval_as, on_error=on_error)


def _claims(probe: Probe) -> bool:
    """Whether a JSON file holds Karpathy splits: an ``images`` list whose first entry has ``sentences``."""
    data = probe.json()
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


FORMAT = Format(
    name="karpathy",
    summary="Karpathy split JSON (.json)",
    read=read_karpathy,
    suffixes=(".json",),
    claims=_claims,
    content="Karpathy ('images' with 'sentences')",
    read_probe=_read_probe,
)
