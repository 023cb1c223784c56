"""The objective interface: loss, logits, probabilities and per-pair model output of one model family, and its
registry."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch


class Objective(abc.ABC):
    """How a dual encoder turns normalized embeddings into a loss, scores and a per-pair output.

    Every method takes normalized image embeddings φ, text embeddings ψ, the logit multiplier ``scale`` = exp(s)
    and, for objectives with :attr:`has_bias`, the learned logit ``bias`` b. The logit of image i and text j is
    ``scale·φ_i·ψ_j (+ b)``.

    Attributes:
        name: The registered name.
        has_bias: Whether models trained with it carry a learned logit bias.
        uses_bank: Whether :meth:`pair_output` needs a fixed bank of negatives.
    """

    name: ClassVar[str]
    has_bias: ClassVar[bool]
    uses_bank: ClassVar[bool]

    @abc.abstractmethod
    def loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's training loss over the global batch; the mean over ranks is the one-process loss.

        Args:
            image_features: This rank's normalized image embeddings (n, D).
            text_features: This rank's normalized text embeddings (n, D); row i pairs with image row i.
            scale: The logit multiplier exp(s), a scalar tensor.
            bias: The logit bias, a scalar tensor (objectives with :attr:`has_bias` only).

        Returns:
            A scalar tensor.
        """

    @abc.abstractmethod
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities that ``logits`` (B, C) of B queries against C candidates stand for, (B, C)."""

    @abc.abstractmethod
    def pair_output(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor | float,
        bias: torch.Tensor | float | None = None,
        bank: tuple[torch.Tensor, torch.Tensor] | None = None,
        excluded: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model output f of pairs (B, D)×(B, D) and its loss weight Q = −∂loss/∂f (detached), each (B,).

        Args:
            image_features: Normalized image embeddings of the pairs.
            text_features: Normalized text embeddings of the pairs.
            scale: The logit multiplier.
            bias: The logit bias (objectives with :attr:`has_bias`).
            bank: ``(images (K, D), texts (K, D))``, fixed negatives (objectives with :attr:`uses_bank`).
            excluded: (B, K) bank entries left out of a row (a pair that is itself in the bank).
        """

    def logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor | float,
        bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """The logits (B, C) of B images against C texts: ``scale·φ·ψᵀ``, plus the bias where there is one."""
        logits = scale * image_features @ text_features.T
        return logits if bias is None else logits + bias

    def pair_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor | float,
        bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """The logit (B,) of each pair (row i with row i): ``scale·φ_i·ψ_i``, plus the bias where there is one."""
        logits = scale * (image_features * text_features).sum(-1)
        return logits if bias is None else logits + bias

    def check_bias(self, bias: torch.Tensor | float | None) -> None:
        """Refuse a bias the objective does not take, or a missing one it needs.

        Raises:
            ValueError: Naming the objective.
        """
        if self.has_bias and bias is None:
            raise ValueError(f"the {self.name} objective needs the model's logit bias")
        if not self.has_bias and bias is not None:
            raise ValueError(f"the {self.name} objective has no logit bias, but one was given")


OBJECTIVES: dict[str, Objective] = {}
"""Registered objectives by name."""


def register_objective(objective: Objective) -> Objective:
    """Add ``objective`` to :data:`OBJECTIVES` under its name and return it.

    Raises:
        ValueError: Another objective is registered under that name.
    """
    known = OBJECTIVES.get(objective.name)
    if known is not None and known is not objective:
        raise ValueError(f"an objective named {objective.name!r} is already registered ({type(known).__name__})")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The registered objective ``name``.

    Raises:
        ValueError: No objective has that name (the message lists the known ones).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Refuse image and text features of different shapes.

    Raises:
        ValueError: Naming both shapes.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape"
        )
