"""A training state stored without pickle: its tensors in a safetensors file, everything else as JSON.

A training state is a tree of dicts, lists and tuples whose leaves are tensors, None, booleans, numbers and strings
(an optimizer's and a scheduler's ``state_dict``, the RNG state, the epoch and step). ``training_state.json`` holds
the tree with every tensor replaced by ``{"__tensor__": KEY}``, the key of that tensor in
``training_state.safetensors``; tuples are written as ``{"__tuple__": [...]}`` and dicts whose keys are not all
plain strings (an optimizer's state is keyed by parameter index) as ``{"__dict__": [[key, value], ...]}``. Reading
builds only these types, so a crafted file cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cliptrace.models.weights import read_tensors

STATE_TREE = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "cliptrace-training-state"
STATE_VERSION = 1
_TAGS = ("__tensor__", "__tuple__", "__dict__")


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON form of ``value``; its tensors go into ``tensors`` under fresh keys."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors) for key, item in value.items()}
        return {"__dict__": [[_encode(key, tensors), _encode(item, tensors)] for key, item in value.items()]}
    raise TypeError(f"a training state holds no {type(value).__name__} values")


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    """The value whose JSON form is ``value`` (see :func:`_encode`)."""
    if isinstance(value, list):
        return [_decode(item, tensors, source) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        tag, content = next(iter(value.items()))
        if tag == "__tensor__":
            if content not in tensors:
                raise ValueError(f"{source.with_name(STATE_TENSORS)}: has no tensor {content!r}, which {source.name} "
                                 "names")
            return tensors[content]
        if not isinstance(content, list):
            raise ValueError(f"{source}: {tag} holds {type(content).__name__}, not a list")
        if tag == "__tuple__":
            return tuple(_decode(item, tensors, source) for item in content)
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in content):
            raise ValueError(f"{source}: __dict__ holds something other than [key, value] pairs")
        return {_decode(key, tensors, source): _decode(item, tensors, source) for key, item in content}
    return {key: _decode(item, tensors, source) for key, item in value.items()}


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as ``training_state.json`` + ``training_state.safetensors`` into ``directory``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": _encode(state, tensors)}
    save_file(tensors, directory / STATE_TENSORS)
    (directory / STATE_TREE).write_text(json.dumps(tree, indent=1) + "\n", encoding="utf-8")


def read_state(directory: Path) -> dict[str, Any]:
    """Read a state written by :func:`write_state`.

    Raises:
        ValueError: A file is missing, unreadable, of another format or a newer version, or names a tensor the
            safetensors file does not hold; the message starts with that file.
    """
    tree_path, tensors_path = directory / STATE_TREE, directory / STATE_TENSORS
    try:
        tree = json.loads(tree_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{tree_path}: not a readable training state ({error})") from error
    if not isinstance(tree, dict) or tree.get("format") != STATE_FORMAT or not isinstance(tree.get("state"), dict):
        raise ValueError(f"{tree_path}: not a cliptrace training state (no format {STATE_FORMAT!r})")
    if tree.get("version") != STATE_VERSION:
        raise ValueError(f"{tree_path}: training state version {tree.get('version')!r}; this cliptrace reads version "
                         f"{STATE_VERSION}")
    try:
        tensors = read_tensors(tensors_path)
    except OSError as error:
        raise ValueError(f"{tensors_path}: not a readable training state ({error.strerror})") from error
    return _decode(tree["state"], tensors, tree_path)
