"""The DualEncoder contract every model adapter fulfils."""

from __future__ import annotations

import abc
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from cliptrace.data.transforms import ImageTransform
from cliptrace.objectives import SOFTMAX, Objective

LOGIT_SCALE_MAX = 4.605170185988092  # ln(100), the clamp open_clip applies after every step


class DualEncoder(nn.Module, abc.ABC):
    """An image tower and a text tower mapping into one embedding space, plus a learned temperature.

    Subclasses set ``self.preprocess`` (PIL image -> tensor) and implement the abstract methods.
    The similarity logit of image ``i`` and text ``t`` is ``exp(logit_scale) * <φ_i, ψ_t>`` with
    normalized embeddings φ, ψ, plus ``logit_bias`` for models that have one. The model's :attr:`objective`
    (softmax InfoNCE unless a subclass says otherwise) defines its loss, probabilities and per-pair output.
    """

    preprocess: ImageTransform

    @abc.abstractmethod
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed a batch of preprocessed images (B, 3, H, W) into (B, D)."""

    @abc.abstractmethod
    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Embed a batch of tokenized texts (B, L) into (B, D)."""

    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize texts to ``{"input_ids", "attention_mask"}`` tensors of shape (B, L)."""

    @property
    @abc.abstractmethod
    def logit_scale(self) -> nn.Parameter:
        """The log of the inverse temperature (a scalar parameter); the logit multiplier is its exp."""

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The learned logit bias (a scalar parameter) of objectives that have one; None here."""
        return None

    @property
    def objective(self) -> Objective:
        """The objective the model trains with (see :mod:`cliptrace.objectives`); softmax InfoNCE here."""
        return SOFTMAX

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write a self-describing model directory that :func:`cliptrace.models.load_model` reads offline."""

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Return normalized image features, normalized text features and the logit multiplier exp(scale), then the
        logit bias for models that have one: the arguments of ``self.objective.loss``."""
        outputs = (
            self.encode_image(pixel_values),
            self.encode_text(input_ids, attention_mask),
            self.logit_scale.exp(),
        )
        bias = self.logit_bias
        return outputs if bias is None else (*outputs, bias)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the log scale to [0, ln 100], as CLIP training does after every optimizer step."""
        self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)


def normalize(features: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """L2-normalize along the last dimension when ``enabled``."""
    return F.normalize(features, dim=-1) if enabled else features


def check_weights_fit(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse weights that belong to another architecture: a tensor the model needs is missing or has another shape.

    Args:
        expected: Parameter name -> shape the model has.
        found: Parameter name -> shape the weights hold (names the model does not use are ignored).
        source: What the weights came from, for the message.

    Raises:
        ValueError: Naming the first mismatched and missing tensors.
    """
    mismatched = [f"{name}: {list(found[name])} in the weights, {list(shape)} in the model"
                  for name, shape in expected.items() if name in found and tuple(found[name]) != tuple(shape)]
    missing = [name for name in expected if name not in found]
    if not mismatched and not missing:
        return
    details = "; ".join(mismatched[:3]) + (f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else "")
    if missing:
        details += ("; " if details else "") + f"missing {missing[:3]}" + (
            f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
    raise ValueError(f"{source}: weights from another architecture ({len(mismatched)} tensor(s) of another "
                     f"shape, {len(missing)} missing): {details}")
