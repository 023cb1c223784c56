"""The self-describing model directory: its ``cliptrace_model.json`` manifest, and loading any adapter from it.

A model directory holds ``cliptrace_model.json``::

    {"format_version": 1, "adapter": "hf_clip" | "siglip" | "frozen_dual_encoder" | "open_clip",
     "preprocess": {"size": ..., "mean": [...], "std": [...]}, "context_length": ..., ...adapter fields}

beside the adapter's weights (``model.safetensors``), configs and tokenizer files. A plain HuggingFace CLIP or SigLIP
directory (``config.json`` of model type ``clip`` or ``siglip``, weights, tokenizer, optionally
``preprocessor_config.json``) loads too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from cliptrace.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from cliptrace.models.base import DualEncoder
from cliptrace.notices import CliptraceWarning

MANIFEST_NAME = "cliptrace_model.json"
FORMAT_VERSION = 1
ADAPTERS = ("hf_clip", "siglip", "frozen_dual_encoder", "open_clip")
ADAPTER_FIELDS = {"frozen_dual_encoder": {"projection_dim": int}, "open_clip": {"model_name": str}}
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
HF_MODEL_TYPES = {"clip": "hf_clip", "siglip": "siglip"}
"""The adapter that loads a plain HuggingFace directory, by its ``config.json`` model type."""


def write_manifest(
    directory: str | Path, adapter: str, preprocess: ImageTransform, context_length: int, **fields: Any
) -> None:
    """Write ``cliptrace_model.json`` into ``directory`` (created if missing); ``fields`` are adapter-specific."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "adapter": adapter,
        "preprocess": preprocess.to_dict(),
        "context_length": context_length,
        **fields,
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """Read and validate ``cliptrace_model.json``; ``None`` when the directory has none.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: The manifest is not valid JSON, lacks a field or holds one of the wrong type, names an
            unknown adapter, or was written by a newer format version.
    """
    directory = require_directory(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}): {error.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    for key in ("format_version", "adapter", "preprocess", "context_length"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
    version = manifest["format_version"]
    if not _is_int(version) or version < 1:
        raise ValueError(f"{path}: key 'format_version' must be a positive integer (got {version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{directory}: model directory format_version {version} is newer than this cliptrace reads "
            f"({FORMAT_VERSION}); upgrade cliptrace"
        )
    if manifest["adapter"] not in ADAPTERS:
        raise ValueError(f"{directory}: unknown adapter {manifest['adapter']!r} in {MANIFEST_NAME}; known: {ADAPTERS}")
    for key, kind in {"context_length": int, **ADAPTER_FIELDS.get(manifest["adapter"], {})}.items():
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
        value = manifest[key]
        if kind is int and not (_is_int(value) and value > 0):
            raise ValueError(f"{path}: key {key!r} must be a positive integer (got {value!r})")
        if kind is str and not (isinstance(value, str) and value):
            raise ValueError(f"{path}: key {key!r} must be a non-empty string (got {value!r})")
    try:
        manifest["preprocess"] = ImageTransform.from_dict(manifest["preprocess"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: key 'preprocess' is malformed ({error!r})") from None
    return manifest


def load_model(directory: str | Path, **kwargs: Any) -> DualEncoder:
    """Load a model directory written by any adapter's ``save``, or a plain HuggingFace CLIP or SigLIP directory.

    Args:
        directory: The model directory.
        **kwargs: Passed to the adapter's loader (e.g. ``attn_implementation="eager"`` for HF CLIP and SigLIP).

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: The manifest is invalid (see :func:`read_manifest`), or the directory has neither a
            manifest nor a HuggingFace ``config.json``.
    """
    from cliptrace.models.frozen import FrozenBackboneDualEncoder
    from cliptrace.models.hf_clip import HFCLIP
    from cliptrace.models.open_clip import OpenCLIPAdapter
    from cliptrace.models.siglip import SigLIPAdapter

    loaders = {
        "hf_clip": HFCLIP.from_pretrained,
        "siglip": SigLIPAdapter.from_pretrained,
        "frozen_dual_encoder": FrozenBackboneDualEncoder.load,
        "open_clip": OpenCLIPAdapter.load,
    }
    manifest = read_manifest(directory)
    if manifest is None:
        if not (Path(directory) / "config.json").is_file():
            raise ValueError(
                f"{directory}: not a model directory (neither {MANIFEST_NAME} nor a HuggingFace config.json)"
            )
        adapter = HF_MODEL_TYPES.get(_model_type(Path(directory)), "hf_clip")  # hf_clip names a wrong type
        return loaders[adapter](directory, **kwargs)
    return loaders[manifest["adapter"]](directory, **kwargs)


def adapter_class(adapter: str) -> type[DualEncoder]:
    """The DualEncoder class of a new model built by ``adapter`` from a preset (``from_preset``).

    Raises:
        ValueError: ``adapter`` builds no models from presets.
    """
    from cliptrace.models.hf_clip import HFCLIP
    from cliptrace.models.siglip import SigLIPAdapter

    classes: dict[str, type[DualEncoder]] = {"hf_clip": HFCLIP, "siglip": SigLIPAdapter}
    if adapter not in classes:
        raise ValueError(f"adapter {adapter!r} builds no model from a preset; these do: {sorted(classes)}")
    return classes[adapter]


def model_directory_of(path: str | Path) -> Path:
    """``path`` when it is a model directory; the final ``model/`` when it is a training run."""
    path = Path(path)
    return path / "model" if (path / "model").is_dir() and not (path / MANIFEST_NAME).is_file() else path


def require_directory(directory: str | Path) -> Path:
    """Return ``directory`` as a Path, or raise ``FileNotFoundError`` naming it when it is not a directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: model directory does not exist")
    return directory


def read_preprocessor_config(directory: str | Path) -> ImageTransform | None:
    """The preprocessing a HuggingFace ``preprocessor_config.json`` declares; ``None`` when there is none.

    The side length is the center-crop size when the file crops, else the resize size. OpenAI CLIP's
    mean and std apply where the file gives none. Resizing to a size other than the crop (e.g. 256 then
    crop 224) is approximated by resizing straight to the crop size, with a warning.

    Raises:
        ValueError: The file is not valid JSON or has no usable size.
    """
    path = Path(directory) / PREPROCESSOR_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}): {error.msg}") from None
    return transform_from_config(data, path)


def transform_from_config(data: dict[str, Any], source: str | Path) -> ImageTransform:
    """The preprocessing a HuggingFace image processor config (``preprocessor_config.json``, or an image
    processor's ``to_dict()``) declares, as :func:`read_preprocessor_config` reads it; ``source`` names it in errors.

    Raises:
        ValueError: The config has no usable size, or a mean or std without 3 values.
    """
    resize = _side(data.get("size"), source, "size")
    crop = _side(data.get("crop_size"), source, "crop_size") if data.get("do_center_crop", True) else None
    size = crop or resize
    if size is None:
        raise ValueError(f"{source}: neither key 'crop_size' nor key 'size' gives an image size")
    if crop and resize and crop != resize:
        warnings.warn(f"{source}: resize {resize} then crop {crop} is approximated by resizing to {crop}",
                      CliptraceWarning, stacklevel=3)
    mean = tuple(float(v) for v in data.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in data.get("image_std", OPENAI_CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{source}: keys 'image_mean' and 'image_std' must hold 3 values each")
    return ImageTransform(size=size, mean=mean, std=std)


def write_preprocessor_config(directory: str | Path, preprocess: ImageTransform) -> None:
    """Write ``preprocess`` as a HuggingFace CLIP ``preprocessor_config.json`` (resize, center crop, normalize)."""
    data = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": preprocess.size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": preprocess.size, "width": preprocess.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
        "do_convert_rgb": True,
    }
    path = Path(directory) / PREPROCESSOR_CONFIG_NAME
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _model_type(directory: Path) -> str | None:
    """The ``model_type`` a HuggingFace ``config.json`` declares; None when it cannot be read (the adapter's
    loader then reports the problem)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _is_int(value: Any) -> bool:
    """Whether a JSON value is an integer (``true``/``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _side(value: Any, path: str | Path, key: str) -> int | None:
    """A side length from an int or a ``{"shortest_edge"}``/``{"height", "width"}`` size entry."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("width", value["height"]) == value["height"]:
            return int(value["height"])
    raise ValueError(f"{path}: key {key!r} = {value!r} is not a square image size")
