"""The dataset formats: one module per format, each declaring a :class:`~cliptrace.data.formats.format.Format`.

Adding a format is one module with a ``FORMAT`` and one line in :data:`REGISTRY`; detection, the format names and the
help texts derive from the registry. Earlier entries win when several formats claim the same file.
"""

from __future__ import annotations

from cliptrace.data.formats import coco, delimited, hf, imagefolder, jsonl, karpathy, parquet, webdataset
from cliptrace.data.formats.format import Format, Probe

REGISTRY: tuple[Format, ...] = (
    delimited.FORMAT,
    jsonl.FORMAT,
    coco.FORMAT,
    karpathy.FORMAT,
    webdataset.FORMAT,
    imagefolder.FORMAT,
    hf.FORMAT,
    parquet.FORMAT,
)
FORMATS: tuple[str, ...] = tuple(format.name for format in REGISTRY)
SUPPORTED: str = ", ".join(format.summary for format in REGISTRY[:-1]) + f", or {REGISTRY[-1].summary}"


def by_name(name: str) -> Format | None:
    """The registered format called ``name``; None when there is none."""
    return next((format for format in REGISTRY if format.name == name), None)


__all__ = ["FORMATS", "REGISTRY", "SUPPORTED", "Format", "Probe", "by_name"]
