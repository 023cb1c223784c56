"""An ``open_clip`` model as a DualEncoder (optional: ``pip install 'cliptrace[open_clip]'``).

``open_clip`` is imported only when a model is built or loaded, because it pulls in ``torchvision``, whose
CUDA wheel breaks CPU-only installs of torch.
"""

from __future__ import annotations

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
from cliptrace.models.directory import MANIFEST_NAME, read_manifest, require_directory, write_manifest
from cliptrace.models.towers.base import ImageTower, TextTower
from cliptrace.models.weights import WEIGHTS_NAME, safetensors_files, tensor_shapes


class OpenCLIPAdapter(DualEncoder):
    """An open_clip CLIP model with its tokenizer and the preprocessing its config declares.

    open_clip's text tower pools at the EOS token found from the ids alone and ignores ``attention_mask``;
    :meth:`tokenize` still returns a mask (ones up to and including the last non-padding token).

    Attributes:
        model: The open_clip model.
        tokenizer: The open_clip tokenizer (texts -> (B, context_length) long tensor, padded with 0).
        preprocess: PIL image -> normalized tensor.
        model_name: The open_clip architecture name (e.g. ``"ViT-B-32"``).
        context_length: Token sequence length.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[..., torch.Tensor], model_name: str) -> None:
        super().__init__()
        if getattr(model, "logit_bias", None) is not None:
            raise ValueError(
                f"open_clip model {model_name!r} has a logit bias (sigmoid loss); only CLIP-style models fit"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.preprocess = _preprocess_from_model(_import_open_clip(), model)
        self.context_length = int(tokenizer.context_length)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | Path | None = None) -> OpenCLIPAdapter:
        """Build open_clip architecture ``model_name``, randomly initialized or from a local checkpoint file.

        Args:
            model_name: An open_clip model config name, e.g. ``"ViT-B-32"``.
            pretrained: A local checkpoint file; pretrained tags (which would download) are refused.

        Raises:
            ImportError: open_clip is not installed.
            FileNotFoundError: ``pretrained`` is not an existing file.
        """
        open_clip = _import_open_clip()
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"pretrained={str(pretrained)!r} is not a local checkpoint file (cliptrace never downloads weights)"
            )
        model = open_clip.create_model(model_name, pretrained=None if pretrained is None else str(pretrained))
        return cls(model, open_clip.get_tokenizer(model_name), model_name)

    @classmethod
    def load(cls, directory: str | Path) -> OpenCLIPAdapter:
        """Load a directory written by :meth:`save`.

        Raises:
            ImportError: open_clip is not installed.
            FileNotFoundError: ``directory`` does not exist.
            ValueError: It is not an open_clip model directory, or its weights are pickled, unreadable or of
                another architecture than the manifest names.
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
        model = open_clip.create_model(manifest["model_name"], pretrained=None)
        try:
            load_safetensors_model(model, weights, strict=True)
        except RuntimeError as error:  # missing, unexpected or reshaped tensors
            raise ValueError(f"{weights}: weights of another architecture than model_name "
                             f"{manifest['model_name']!r} in {directory / MANIFEST_NAME} "
                             f"({' '.join(str(error).split())})") from None
        adapter = cls(model, open_clip.get_tokenizer(manifest["model_name"]), manifest["model_name"])
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
        """Write ``model.safetensors`` and the manifest (naming the open_clip architecture)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors_model(self.model, str(directory / WEIGHTS_NAME))
        write_manifest(directory, "open_clip", self.preprocess, self.context_length, model_name=self.model_name)


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


def _preprocess_from_model(open_clip: ModuleType, model: nn.Module) -> ImageTransform:
    """The image size, mean and std open_clip recorded on the model."""
    config: dict[str, Any] = open_clip.get_model_preprocess_cfg(model)
    size = config["size"]
    side = size if isinstance(size, int) else size[0]
    if not isinstance(size, int) and size[0] != size[1]:
        raise ValueError(f"open_clip model input size {tuple(size)} is not square")
    return ImageTransform(size=int(side), mean=tuple(config["mean"]), std=tuple(config["std"]))
