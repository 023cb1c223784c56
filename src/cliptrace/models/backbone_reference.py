"""A locked backbone kept by reference: the directory it was loaded from and the sha256 of the files defining it.

A model directory (and so every checkpoint) of a model with a locked backbone loaded from a local HuggingFace
directory holds no copy of that backbone's weights: its manifest names the backbone's absolute path and the sha256
of its ``config.json`` and weight files, and loading checks them, so a model never silently runs on other weights
than the ones it was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliptrace.files import file_sha256


class BackboneChangedError(ValueError):
    """A locked backbone a model directory references is missing or no longer has the files it was saved with."""


@dataclass(frozen=True)
class BackboneReference:
    """Where a locked backbone lives and what its files were.

    Attributes:
        path: The backbone's directory, absolute.
        sha256: File name (relative to ``path``) -> hex sha256 of its contents, for ``config.json`` and every
            weight file.
    """

    path: Path
    sha256: dict[str, str]

    @classmethod
    def of(cls, directory: str | Path, files: Iterable[Path]) -> BackboneReference:
        """The reference of the backbone in ``directory`` defined by ``files`` (paths inside it), hashed now."""
        directory = Path(directory).resolve()
        digests = {Path(path).resolve().relative_to(directory).as_posix(): file_sha256(path) for path in files}
        return cls(directory, dict(sorted(digests.items())))

    def check(self, model_dir: Path, tower: str) -> None:
        """Raise unless every referenced file still exists with its recorded sha256.

        Args:
            model_dir: The model directory (or checkpoint) holding the reference, named in the error.
            tower: ``"image"`` or ``"text"``, named in the error.

        Raises:
            BackboneChangedError: The backbone directory or one of its files is missing, or a file changed.
        """
        for name, digest in self.sha256.items():
            path = self.path / name
            if not path.is_file():
                raise BackboneChangedError(
                    f"{model_dir}: its locked {tower} backbone {self.path} is missing ({name} not found); the model "
                    "directory holds no copy of it: restore the backbone there")
            if file_sha256(path) != digest:
                raise BackboneChangedError(
                    f"{model_dir}: its locked {tower} backbone {self.path} changed since it was saved ({name}: sha256 "
                    "differs); restore the backbone it was trained with, or train again from the changed one")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in a model manifest."""
        return {"path": str(self.path), "sha256": dict(self.sha256)}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> BackboneReference:
        """Read the JSON form of :meth:`to_dict`.

        Raises:
            ValueError: ``data`` is malformed; the message starts with ``source``.
        """
        path, digests = (data.get("path"), data.get("sha256")) if isinstance(data, dict) else (None, None)
        if not (isinstance(path, str) and Path(path).is_absolute() and isinstance(digests, dict) and digests
                and all(isinstance(name, str) and isinstance(value, str) for name, value in digests.items())):
            raise ValueError(f"{source}: a backbone reference needs an absolute 'path' and a non-empty 'sha256' table "
                             f"of file name -> digest (got {data!r})")
        return cls(Path(path), dict(digests))
