"""An ``open_clip`` model as a DualEncoder (optional: ``pip install 'cliptrace[open_clip]'``).

``open_clip`` is imported only when a model is built or loaded, because it pulls in ``torchvision``, whose
CUDA wheel breaks CPU-only installs of torch.

A saved model directory holds the model's open_clip config as ``open_clip_config.json`` (open_clip's own
``local-dir:`` format, ``{"model_cfg": ..., "preprocess_cfg": ...}``) and is rebuilt from it, so a custom config
reloads in a process where open_clip's registry has never heard of it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from cliptrace.data.transforms import ImageTransform
from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import read_manifest, require_directory, write_manifest
from cliptrace.models.towers.base import ImageTower, TextTower
from cliptrace.models.weights import WEIGHTS_NAME, safetensors_files, tensor_shapes

CONFIG_NAME = "open_clip_config.json"


class OpenCLIPAdapter(DualEncoder):
    """An open_clip CLIP model with its tokenizer and the preprocessing its config declares.

    open_clip's text tower pools at the EOS token found from the ids alone and ignores ``attention_mask``;
    :meth:`tokenize` still returns a mask (ones up to and including the last non-padding token).

    Attributes:
        model: The open_clip model.
        tokenizer: The open_clip tokenizer (texts -> (B, context_length) long tensor, padded with 0).
        preprocess: PIL image -> normalized tensor.
        model_name: The open_clip architecture name (e.g. ``"ViT-B-32"``), or a name for a custom config.
        model_config: The open_clip model config the model was built from (``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ...), written beside the weights by :meth:`save`.
        context_length: Token sequence length.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[..., torch.Tensor], model_name: str,
                 model_config: dict[str, Any]) -> None:
        super().__init__()
        if getattr(model, "logit_bias", None) is not None:
            raise ValueError(
                f"open_clip model {model_name!r} has a logit bias (sigmoid loss); only CLIP-style models fit"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_config = model_config
        self.preprocess = _preprocess_from_model(_import_open_clip(), model)
        self.context_length = int(tokenizer.context_length)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | Path | None = None,
                       output_dict: bool = False) -> OpenCLIPAdapter:
        """Build open_clip architecture ``model_name``, randomly initialized or from a local checkpoint file.

        Args:
            model_name: An open_clip model config name, e.g. ``"ViT-B-32"`` (or one added with
                ``open_clip.add_model_config``).
            pretrained: A local checkpoint file; pretrained tags (which would download) are refused.
            output_dict: Build the model so that its ``forward`` returns a dict.

        Raises:
            ImportError: open_clip is not installed.
            FileNotFoundError: ``pretrained`` is not an existing file.
            ValueError: open_clip knows no config named ``model_name``.
        """
        open_clip = _import_open_clip()
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"pretrained={str(pretrained)!r} is not a local checkpoint file (cliptrace never downloads weights)"
            )
        config = open_clip.get_model_config(model_name)
        if config is None:
            raise ValueError(f"open_clip has no model config named {model_name!r}; build a custom config with "
                             f"OpenCLIPAdapter.from_config")
        model = open_clip.create_model(model_name, pretrained=None if pretrained is None else str(pretrained),
                                       output_dict=output_dict)
        return cls(model, open_clip.get_tokenizer(model_name), model_name, config)

    @classmethod
    def from_config(cls, config: dict[str, Any], model_name: str = "custom",
                    output_dict: bool = False) -> OpenCLIPAdapter:
        """Build a randomly initialized model from an open_clip model config, without open_clip's registry.

        Args:
            config: An open_clip model config: ``embed_dim``, ``vision_cfg``, ``text_cfg`` and optional keys.
            model_name: The name recorded for it.
            output_dict: Build the model so that its ``forward`` returns a dict.

        Raises:
            ImportError: open_clip is not installed.
            ValueError: ``config`` lacks one of the three keys.
        """
        model, tokenizer = _build(_import_open_clip(), model_name, config, output_dict)
        return cls(model, tokenizer, model_name, config)

    @classmethod
    def load(cls, directory: str | Path) -> OpenCLIPAdapter:
        """Load a directory written by :meth:`save`.

        Directories without ``open_clip_config.json`` (written before it was saved) rebuild the architecture that
        ``model_name`` names in open_clip's registry.

        Raises:
            ImportError: open_clip is not installed.
            FileNotFoundError: ``directory`` does not exist.
            ValueError: It is not an open_clip model directory, its config is malformed or (without one) unknown to
                open_clip, or its weights are pickled, unreadable or of another architecture than the config.
        """
        directory = require_directory(directory)
        manifest = read_manifest(directory)
        if manifest is None or manifest["adapter"] != "open_clip":
            raise ValueError(f"{directory}: not an open_clip model directory")
        weights = safetensors_files(directory)[0]
        if weights.name != WEIGHTS_NAME:
            raise ValueError(f"{directory}: the open_clip adapter reads one {WEIGHTS_NAME}, not shards")
        tensor_shapes(weights)  # reading the header refuses a truncated or corrupt file, naming it
        open_clip = _import_open_clip()
        name, output_dict = manifest["model_name"], bool(manifest.get("output_dict", False))
        config = _read_config(directory) if (directory / CONFIG_NAME).is_file() else open_clip.get_model_config(name)
        if config is None:
            raise ValueError(f"{directory}: no {CONFIG_NAME}, and open_clip has no model config named {name!r}")
        model, tokenizer = _build(open_clip, name, config, output_dict)
        try:
            load_safetensors_model(model, weights, strict=True)
        except RuntimeError as error:  # missing, unexpected or reshaped tensors
            raise ValueError(f"{weights}: weights of another architecture than the open_clip config of "
                             f"{directory} ({' '.join(str(error).split())})") from None
        adapter = cls(model, tokenizer, name, config)
        adapter.preprocess = manifest["preprocess"]
        return adapter

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images (B, 3, H, W) into (B, D)."""
        return self.model.encode_image(pixel_values, normalize=normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Embed tokenized texts (B, L) into (B, D); ``attention_mask`` is unused by open_clip."""
        return self.model.encode_text(input_ids, normalize=normalize)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize to (B, context_length) ``input_ids`` and ``attention_mask``."""
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, not one string")
        input_ids = self.tokenizer(list(texts))
        positions = torch.arange(input_ids.shape[1])
        last = torch.where(input_ids != 0, positions, -1).amax(dim=1, keepdim=True)
        return {"input_ids": input_ids, "attention_mask": (positions <= last).long()}

    @property
    def logit_scale(self) -> nn.Parameter:
        """The model's log inverse temperature."""
        return self.model.logit_scale

    def image_tower(self) -> ImageTower:
        """The vision tower described for the exact decomposition and the attention methods.

        Raises:
            TowerUnavailable: It is not a class-token ViT of plain blocks (see
                :mod:`cliptrace.models.towers.open_clip`).
        """
        from cliptrace.models.towers.open_clip import OpenCLIPImageTower

        return OpenCLIPImageTower(self.model)

    def text_tower(self) -> TextTower:
        """The text tower described for the exact decomposition and the attention methods.

        Raises:
            TowerUnavailable: It is not a transformer of plain blocks pooled at one token.
        """
        from cliptrace.models.towers.open_clip import OpenCLIPTextTower

        return OpenCLIPTextTower(self.model, self.tokenizer)

    def save(self, directory: str | Path) -> None:
        """Write ``model.safetensors``, the model's ``open_clip_config.json`` and the manifest."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors_model(self.model, str(directory / WEIGHTS_NAME))
        _write_config(directory, self.model_config, self.preprocess)
        write_manifest(directory, "open_clip", self.preprocess, self.context_length, model_name=self.model_name,
                       output_dict=bool(getattr(self.model, "output_dict", False)))


def _import_open_clip() -> ModuleType:
    """Import open_clip, or explain how to install it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "the open_clip adapter needs open_clip: pip install 'cliptrace[open_clip]' "
            "(it pulls in torchvision, whose CUDA wheel breaks CPU-only torch installs)"
        ) from error
    return open_clip


def _write_config(directory: Path, config: dict[str, Any], preprocess: ImageTransform | None) -> None:
    """Write ``config`` as open_clip's ``local-dir:`` config file, with the image size, mean and std."""
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"an open_clip model config needs the keys embed_dim, vision_cfg and text_cfg; missing "
                         f"{missing}")
    document: dict[str, Any] = {"model_cfg": config}
    if preprocess is not None:
        document["preprocess_cfg"] = {"size": preprocess.size, "mean": list(preprocess.mean),
                                      "std": list(preprocess.std)}
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _read_config(directory: Path) -> dict[str, Any]:
    """The model config in ``directory``'s ``open_clip_config.json``."""
    path = directory / CONFIG_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    config = document.get("model_cfg") if isinstance(document, dict) else None
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ValueError(f"{path}: expected {{\"model_cfg\": {{\"embed_dim\", \"vision_cfg\", \"text_cfg\", ...}}}}")
    return config


def _build(open_clip: ModuleType, model_name: str, config: dict[str, Any],
           output_dict: bool) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """A randomly initialized model and its tokenizer from ``config``, through open_clip's ``local-dir:`` loader.

    The tokenizer comes from open_clip's registry when it holds ``model_name`` with this very config (SigLIP and
    HuggingFace tokenizers are chosen by name there), else from the config alone (a config naming a HuggingFace
    tokenizer then fails: open_clip looks for its files in the config's folder).
    """
    with tempfile.TemporaryDirectory() as folder:
        _write_config(Path(folder), config, None)
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, output_dict=output_dict)
        registered = open_clip.get_model_config(model_name) == config
        return model, open_clip.get_tokenizer(model_name if registered else f"local-dir:{folder}")


def _preprocess_from_model(open_clip: ModuleType, model: nn.Module) -> ImageTransform:
    """The image size, mean and std open_clip recorded on the model."""
    config: dict[str, Any] = open_clip.get_model_preprocess_cfg(model)
    size = config["size"]
    side = size if isinstance(size, int) else size[0]
    if not isinstance(size, int) and size[0] != size[1]:
        raise ValueError(f"open_clip model input size {tuple(size)} is not square")
    return ImageTransform(size=int(side), mean=tuple(config["mean"]), std=tuple(config["std"]))
