"""Exact additive decomposition of a dual encoder's similarity over image patches and caption tokens.

The real forward pass fixes every nonlinear quantity: attention probabilities, LayerNorm standard deviations,
activation gates and the embedding norms. With those frozen, both towers are affine in their input embeddings, so
each patch embedding and each token embedding owns a component of the image or text embedding, and one constant
source owns the rest (class and position embeddings, biases, LayerNorm shifts). The components are pushed through
every layer of the described towers (:mod:`cliptrace.models.towers`) by :mod:`cliptrace.explain.propagation` and
sum to the real embeddings to float precision. The logit ``τ ⟨φ, ψ⟩`` of ``φ = Σ_s φ_s`` and ``ψ = Σ_t ψ_t`` then
splits exactly into the patch × token interaction matrix ``τ ⟨φ_s, ψ_t⟩``.
"""

from __future__ import annotations

import torch

from cliptrace.explain import propagation
from cliptrace.explain.base import AttributionMethod, image_tower, text_tower
from cliptrace.models.base import DualEncoder


def image_components(
    model: DualEncoder, pixel_values: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-patch components of the normalized image embedding, (B, P + 1, E); the last row is the constant source.

    Patch s owns its patch embedding (the patch-embedding convolution of its pixels); the constant source owns
    the class embedding (if any) and all position embeddings. ``components.sum(1)`` is
    ``model.encode_image(pixel_values)``.

    Args:
        model: A dual encoder that describes its image tower.
        pixel_values: Preprocessed images (B, 3, H, W) at the model's input size.
        chunk_size: Sources propagated at a time (all by default). Memory grows with
            ``B · chunk_size · positions · MLP width``; a smaller chunk trades time for memory on large models.

    Raises:
        TowerUnavailable: The model does not describe its image tower.
    """
    tower = image_tower(model, "the exact decomposition")
    return propagation.components(tower, tower.embed(pixel_values), chunk_size=chunk_size)


def text_components(
    model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-token components of the normalized text embedding, (B, L + 1, E); the last row is the constant source.

    Token t owns its token embedding; the constant source owns the position (and token-type) embeddings. Padding
    tokens own exactly zero where no pooled position sees them (causal or padding-masked towers).
    ``components.sum(1)`` is ``model.encode_text(...)``. ``chunk_size`` is as in :func:`image_components`.

    Raises:
        TowerUnavailable: The model does not describe its text tower.
    """
    tower = text_tower(model, "the exact decomposition")
    return propagation.components(tower, tower.embed(input_ids, attention_mask), chunk_size=chunk_size)


def interaction(model: DualEncoder, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The logit split over sources: ``τ ⟨φ_s, ψ_t⟩`` of image components (B, S, E) and text components (B, T, E)."""
    return model.logit_scale.exp() * torch.einsum("bse,bte->bst", image, text)


class ExactDecomposition(AttributionMethod):
    """Exact patch and token contributions to the logit, summing to it with the constant source.

    Needs a model that describes its towers (:class:`~cliptrace.models.towers.DescribesTowers`).

    The image map of patch s is ``τ ⟨φ_s, v⟩`` for the text side v; the text map of token t is ``τ ⟨u, ψ_t⟩``.
    Both are signed and, with the constant source, sum to the logit to float precision.
    """

    name = "decomposition"
    image_level = "patch"
    needs_image_tower = True

    def __init__(self, chunk_size: int | None = None) -> None:
        """``chunk_size``: sources propagated at a time (see :func:`image_components`); all by default."""
        self.chunk_size = chunk_size

    @torch.no_grad()
    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Patch contributions (B, gh, gw); the constant source's share is ``logit − map.sum()``."""
        components = image_components(model, pixel_values, chunk_size=self.chunk_size)
        scores = side_scores(model, components, text_side)
        return scores[:, :-1].reshape(-1, *image_tower(model, "a patch grid").grid(pixel_values))

    @torch.no_grad()
    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Token contributions (B, L); zero at padding no pooled position sees."""
        components = text_components(model, input_ids, attention_mask, chunk_size=self.chunk_size)
        return side_scores(model, components, image_side)[:, :-1]


def side_scores(model: DualEncoder, components: torch.Tensor, other_side: torch.Tensor) -> torch.Tensor:
    """``τ ⟨component_s, other_side⟩`` for every source, (B, S): the logit split over one tower's sources."""
    other_side = other_side.to(components.dtype)
    return model.logit_scale.exp() * torch.einsum("bse,be->bs", components, other_side)
