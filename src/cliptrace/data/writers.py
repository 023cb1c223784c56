"""Writing records as a new dataset in a registered format (the formats whose :class:`Format` has a ``write``).

A written dataset reads back, with the format's default reader options, into the same records: ids, captions in
order, splits and labels; images are referenced by absolute path (file formats) or copied (WebDataset shards). It is
written into ``OUT.partial`` and renamed to ``OUT`` when complete, so a half-written dataset is never left under the
final name. Columns or keys the records do not carry (anything beyond id, image, captions, split and label) are not
written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from cliptrace.data.formats import REGISTRY, by_name
from cliptrace.data.record import DatasetError, Record

WRITABLE: tuple[str, ...] = tuple(format.name for format in REGISTRY if format.write is not None)
"""The formats :func:`write_records` writes."""


def write_records(records: Sequence[Record], out: str | Path, format: str) -> Path:
    """Write ``records`` as a new ``format`` dataset in the directory ``out``; return the path to read.

    Raises:
        DatasetError: ``format`` has no writer, or ``out`` exists and is not an empty directory.
    """
    out = Path(out)
    known = by_name(format)
    if known is None or known.write is None:
        raise DatasetError(str(out), None, f"cannot write a {format!r} dataset; formats with a writer: "
                                           f"{', '.join(WRITABLE)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(str(out), None, "exists and is not an empty directory; a dataset is written to a new one")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    path = known.write(list(records), partial)
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out / path.relative_to(partial)
