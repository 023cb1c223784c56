"""The weight files of a model directory: safetensors only, read with errors that name the file.

Pickled weights (``pytorch_model.bin`` and the like) are refused before anything reads them: unpickling a file
can run any code it carries. Every read of a weight file goes through here, so a truncated or corrupt file is a
one-line ``ValueError`` that names it instead of a ``SafetensorError``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLED_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt")
CONVERT_HINT = ("to convert them, load the model yourself where you trust the file (e.g. CLIPModel.from_pretrained) "
                "and save_pretrained it, which writes model.safetensors")


def safetensors_files(directory: Path, named: str | None = None) -> list[Path]:
    """The safetensors files holding a HuggingFace model directory's weights.

    The file ``named`` (a config's ``transformers_weights`` entry, which transformers loads first) when given, else
    ``model.safetensors``, else the shards ``model.safetensors.index.json`` lists. Pickled weights are never taken.

    Raises:
        ValueError: The directory holds only pickled weights (naming the file), ``named`` is not a safetensors
            file or index, there are no weights, or an index is not valid JSON or names a missing shard.
    """
    if named is not None:
        return _named_files(directory, named)
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        return _shards(index)
    pickled = sorted(path for pattern in PICKLED_WEIGHT_PATTERNS for path in directory.glob(pattern))
    if pickled:
        raise ValueError(f"{pickled[0]}: pickled weights are not loaded (unpickling can run code the file carries); "
                         f"{CONVERT_HINT}")
    raise ValueError(f"{directory}: no weights ({WEIGHTS_NAME}, or {WEIGHTS_INDEX_NAME} with its shards)")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, reading no tensor data.

    safetensors checks on opening that the header covers the file exactly, so a truncated file fails here.

    Raises:
        ValueError: The file is not a readable safetensors file (naming it).
    """
    try:
        with safe_open(path, "pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt: {error})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU.

    Raises:
        ValueError: The file is not a readable safetensors file (naming it).
    """
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt: {error})") from None


def _named_files(directory: Path, named: str) -> list[Path]:
    """The weight files a config's ``transformers_weights`` entry names: a safetensors file or index inside
    ``directory``."""
    config = directory / "config.json"
    if not isinstance(named, str) or not named.endswith((".safetensors", ".safetensors.index.json")):
        raise ValueError(f"{config}: key 'transformers_weights' names {named!r}, not a safetensors file; pickled "
                         f"weights are not loaded (unpickling can run code the file carries)")
    path = directory / named
    relative = Path(os.path.normpath(named))  # lexically: a cache's files may be symbolic links to elsewhere
    if relative.is_absolute() or relative.parts[:1] == ("..",):
        raise ValueError(f"{config}: key 'transformers_weights' names {named!r}, outside the model directory")
    if not path.is_file():
        raise ValueError(f"{config}: key 'transformers_weights' names {named!r}, which does not exist")
    return _shards(path) if named.endswith(".index.json") else [path]


def _shards(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` maps tensors to, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index}: not valid JSON ({error})") from None
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file") from None
    shards = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"{index}: shard {name!r} is not a safetensors file name inside the directory")
        shard = index.parent / name
        if not shard.is_file():
            raise ValueError(f"{index}: shard {name} is missing")
        shards.append(shard)
    return shards
