"""The hf format: a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.

A ``DatasetDict`` folder (``dataset_dict.json``) gives one split per key (``validation`` and ``valid`` become
``val``); a ``Dataset`` folder (``state.json``) is one split, ``default_split``. The Arrow files are read
memory-mapped with ``pyarrow`` (extra ``cliptrace[hf]``); images stay in them until loaded. A row's default id is its
number in its split, after ``KEY/`` in a ``DatasetDict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cliptrace.data.formats.format import Format
from cliptrace.data.formats.rows import OnError, RecordSet, split_name
from cliptrace.data.formats.table import Part, add_rows, columns
from cliptrace.data.formats.text import load_json
from cliptrace.data.record import DatasetError, Record
from cliptrace.data.tables import import_pyarrow


def _splits(folder: Path) -> list[tuple[str | None, Path]]:
    """(``DatasetDict`` key or None, ``Dataset`` folder) of every split of a ``save_to_disk`` folder."""
    listing = folder / "dataset_dict.json"
    if listing.is_file():
        listed = load_json(listing)
        keys = listed.get("splits") if isinstance(listed, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise DatasetError(str(listing), None, "expected an object with a 'splits' list of names")
        return [(key, folder / key) for key in keys]
    if (folder / "state.json").is_file():
        return [(None, folder)]
    raise DatasetError(str(folder), None, "holds neither dataset_dict.json nor state.json (not a save_to_disk folder)")


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``Dataset`` folder, in row order."""
    state_file = folder / "state.json"
    state = load_json(state_file)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(item, dict) and "filename" in item for item in files):
        raise DatasetError(str(state_file), None, "expected an object with a '_data_files' list of {filename}")
    return [folder / item["filename"] for item in files]


def read_hf(
    path: str | Path,
    *,
    image_key: str | None = None,
    caption_key: str | Sequence[str] | None = None,
    split_key: str | None = "split",
    id_key: str | None = "id",
    label_key: str | None = "label",
    default_split: str = "train",
    image_root: str | Path | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """Read a HuggingFace ``datasets`` ``save_to_disk`` folder (see the module docstring).

    Args:
        path: The folder of a ``Dataset`` or a ``DatasetDict``.
        image_key: Image column (a ``datasets`` Image feature, binary, or image paths); by default the first of
            ``image``, ``img``, ``jpg``, ``png``, ``image_bytes``.
        caption_key: Caption column (a string or a list of strings), or several; by default the first of
            ``caption``, ``text``, ``captions``, ``sentences``.
        split_key: Optional split column; a row's value there beats the folder's split.
        id_key: Optional id column; by default the id is the row's number in its split.
        label_key: Optional class-label column.
        default_split: Split of a ``Dataset`` folder's rows.
        image_root: Directory relative image paths are resolved against; ``path`` when None.
        on_error: Receives each broken row (location ``row N`` of its Arrow file), which is then skipped; when None
            the first one raises.
    """
    folder = Path(path)
    pa = import_pyarrow(str(folder))
    root = str(Path(image_root if image_root is not None else folder).absolute())
    keys = dict(image_key=image_key, caption_key=caption_key, id_key=id_key, split_key=split_key, label_key=label_key)
    records = RecordSet()
    for key, split_folder in _splits(folder):
        counted = 0
        for file in _arrow_files(split_folder):
            source = str(file.absolute())
            try:
                table = pa.ipc.open_stream(pa.memory_map(source, "r")).read_all()
            except FileNotFoundError:
                raise DatasetError(source, None, "file not found") from None
            except (OSError, pa.ArrowException) as error:
                raise DatasetError(source, None, f"not a readable Arrow stream file ({error})") from None
            found = columns(table.schema, source, **keys)
            split = split_name(key) if key is not None else default_split
            part = Part(source, 0, split, f"{key}/" if key is not None else "", counted, root)
            add_rows(records, table, found, part, on_error)
            counted += table.num_rows
    return records.records()


def _find(directory: Path) -> Path | None:
    """The directory itself when ``save_to_disk`` wrote it."""
    if (directory / "dataset_dict.json").is_file():
        return directory
    return directory if (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file() else None


FORMAT = Format(
    name="hf",
    summary="a HuggingFace datasets save_to_disk folder (a Dataset or a DatasetDict)",
    read=read_hf,
    find=_find,
)
