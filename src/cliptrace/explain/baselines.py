"""Baseline attribution methods: gradients, integrated gradients, occlusion, attention rollout, Chefer relevance,
Grad-CAM and a random control, one class per algorithm as in captum.

Every method explains :func:`~cliptrace.explain.base.image_logit` (image maps) or
:func:`~cliptrace.explain.base.text_logit` (text maps), row by row: row b is explained w.r.t. its own text side
(or image side). Pixel-space methods work on any DualEncoder; occlusion and the random map need only a patch grid
(:func:`~cliptrace.explain.base.patch_grid`). Methods that look inside a tower (embedding gradients, attention,
Grad-CAM, token maps) run on its description (:mod:`cliptrace.models.towers`) through
:func:`cliptrace.explain.propagation.trace`, the tower's forward pass with its attention probabilities exposed;
they change no parameter, ``requires_grad`` flag or attention implementation. Token maps are zero at padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from captum.attr import FeatureAblation, InputXGradient, LayerIntegratedGradients, Saliency
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
import torch

from cliptrace.explain.base import (
    AttributionMethod,
    ImageLevel,
    image_logit,
    image_tower,
    patch_grid,
    text_logit,
    text_tower,
)
from cliptrace.explain.propagation import Trace, trace
from cliptrace.models.base import DualEncoder
from cliptrace.models.towers.base import AttentionPool, Embedding, MeanPool, TextTower, TokenPool, Tower

Modality = Literal["image", "text"]
Inputs = tuple[torch.Tensor, ...]  # (pixel_values,) or (input_ids, attention_mask)


def _tower(model: DualEncoder, modality: Modality, needs: str) -> Tower:
    """The described image or text tower."""
    return image_tower(model, needs) if modality == "image" else text_tower(model, needs)


def _traced_logit(
    model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor, needs: str
) -> tuple[Embedding, Trace, torch.Tensor]:
    """The tower's embedding of ``inputs``, its traced forward pass and the logit with ``side`` per row."""
    tower = _tower(model, modality, needs)
    embedding = tower.embed(*inputs)
    traced = trace(tower, embedding)
    logit = model.logit_scale.exp() * (traced.embedding * side.to(traced.embedding.dtype)).sum(-1)
    return embedding, traced, logit


def _source_map(values: torch.Tensor, modality: Modality, inputs: Inputs, model: DualEncoder) -> torch.Tensor:
    """Per-source values (B, S) as a map: the patch grid (B, gh, gw), or tokens (B, L) zero at padding."""
    if modality == "image":
        return values.reshape(-1, *patch_grid(model, inputs[0]))
    return values * inputs[1]


def _pooled_row(matrix: torch.Tensor, embedding: Embedding, pool_matrix: torch.Tensor | None) -> torch.Tensor:
    """The pooled position's row of (B, N, N) position-to-position scores, at the sources: (B, S).

    With mean pooling the row is the pooled mean of the rows; with an attention-pool head it is the head's
    (B, 1, N) scores times the matrix.
    """
    if isinstance(embedding.pool, TokenPool):
        row = matrix[torch.arange(matrix.shape[0], device=matrix.device), embedding.pool.positions]
    elif isinstance(embedding.pool, MeanPool):
        row = torch.einsum("bn,bnm->bm", embedding.pool.weights.to(matrix.dtype), matrix)
    else:
        row = (pool_matrix @ matrix)[:, 0]
    return row[:, embedding.positions]


def _content_mask(tower: TextTower, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """True at tokens that may be attributed: not padding and not a special token (BOS, EOS, pad)."""
    specials = torch.tensor(sorted(tower.special_ids), device=input_ids.device, dtype=input_ids.dtype)
    return attention_mask.bool() & ~torch.isin(input_ids, specials)


def _moves_pool(tower: TextTower, replaced: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether replacing ``input_ids`` by ``replaced`` changes the position a token-pooling tower pools at."""
    pool, original = tower.embed(replaced, mask).pool, tower.embed(input_ids, mask).pool
    return isinstance(pool, TokenPool) and not torch.equal(pool.positions, original.positions)


def _embedding_map(
    model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor, times_input: bool
) -> torch.Tensor:
    """Per patch (B, gh, gw) or token (B, L) of the input embeddings e: ‖∂f/∂e‖₂, or Σ_d e·∂f/∂e with
    ``times_input`` (class and position embeddings excluded)."""
    with torch.enable_grad():
        _, traced, logit = _traced_logit(model, modality, inputs, side, "an embedding-space map")
        (gradient,) = torch.autograd.grad(logit.sum(), traced.sources)
    relevance = (traced.sources.detach() * gradient).sum(-1) if times_input else gradient.norm(dim=-1)
    return _source_map(relevance, modality, inputs, model)


def _attentions(
    model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor, gradients: bool
) -> tuple[Embedding, list[torch.Tensor], list[torch.Tensor] | None]:
    """Every attention's probabilities (B, heads, N, N) and, with ``gradients``, the logit's gradient w.r.t.
    each; an attention-pool head's (B, heads, 1, N) come last."""
    with torch.set_grad_enabled(gradients):
        embedding, traced, logit = _traced_logit(model, modality, inputs, side, "an attention map")
        attentions = traced.attentions + ([] if traced.pool_attention is None else [traced.pool_attention])
        grads = list(torch.autograd.grad(logit.sum(), attentions)) if gradients else None
    return embedding, [attention.detach() for attention in attentions], grads


def _split_pool(embedding: Embedding, matrices: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Per-block (B, N, N) matrices and the attention-pool head's (B, 1, N), if the tower has one."""
    if isinstance(embedding.pool, AttentionPool):
        return matrices[:-1], matrices[-1]
    return matrices, None


def _gradient_forward(model: DualEncoder) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(pixel_values, text_side) -> image_logit``: the forward function handed to captum."""
    return lambda pixel_values, text_side: image_logit(model, pixel_values, text_side)


def _text_forward(model: DualEncoder) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(input_ids, attention_mask, image_side) -> text_logit``: the forward function handed to captum."""
    return lambda input_ids, attention_mask, image_side: text_logit(model, input_ids, attention_mask, image_side)


class Gradient(AttributionMethod):
    """Vanilla gradient saliency (Simonyan, Vedaldi & Zisserman 2014): ``max_c |∂f/∂x_c|`` per pixel.

    Works for any DualEncoder. The token map (described text towers) is ``‖∂f/∂e‖₂`` of each token embedding e.
    """

    name = "gradient"
    image_level: ImageLevel = "pixel"

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """|gradient| max over colour channels, (B, H, W)."""
        saliency = Saliency(_gradient_forward(model))
        inputs = pixel_values.detach().requires_grad_(True)
        return saliency.attribute(inputs, abs=True, additional_forward_args=(text_side,)).amax(1).detach()

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """L2 norm of the gradient w.r.t. each token embedding, (B, L)."""
        return _embedding_map(model, "text", (input_ids, attention_mask), image_side, times_input=False)


class GradientXInput(AttributionMethod):
    """Gradient × input (Shrikumar et al. 2016): ``Σ_c x_c ∂f/∂x_c`` per pixel, in normalized pixel space.

    Works for any DualEncoder. The token map (described text towers) is ``Σ_d e_d ∂f/∂e_d`` of each token
    embedding e.
    """

    name = "gradient_x_input"
    image_level: ImageLevel = "pixel"

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """x·gradient summed over colour channels, (B, H, W)."""
        method = InputXGradient(_gradient_forward(model))
        inputs = pixel_values.detach().requires_grad_(True)
        return method.attribute(inputs, additional_forward_args=(text_side,)).sum(1).detach()

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Token embedding · gradient summed over the embedding dimension, (B, L)."""
        return _embedding_map(model, "text", (input_ids, attention_mask), image_side, times_input=True)


class PatchGradient(AttributionMethod):
    """Saliency in embedding space: ``‖∂f/∂e‖₂`` of each patch embedding e (the patch-embedding conv output),
    i.e. how fast the logit moves when the patch's embedding is perturbed. Needs a described image tower.

    The token map is the same norm on token embeddings.
    """

    name = "patch_gradient"
    image_level: ImageLevel = "patch"
    needs_image_tower = True
    times_input = False

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """The map of each patch embedding, (B, gh, gw)."""
        return _embedding_map(model, "image", (pixel_values,), text_side, times_input=self.times_input)

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """The map of each token embedding, (B, L)."""
        return _embedding_map(model, "text", (input_ids, attention_mask), image_side, times_input=self.times_input)


class PatchGradientXInput(PatchGradient):
    """Gradient × input in embedding space: ``Σ_d e_d ∂f/∂e_d`` per patch embedding e (the patch-embedding conv
    output; class and position embeddings excluded). Needs a described image tower. The token map is the same on
    token embeddings.
    """

    name = "patch_gradient_x_input"
    times_input = True


class IntegratedGradients(AttributionMethod):
    """Integrated gradients (Sundararajan, Taly & Yan 2017) with captum, per pixel summed over colour channels.

    The image baseline is ``baseline`` in normalized pixel space (0: the dataset mean colour); the maps sum to
    about ``f(x) − f(baseline)``. Works for any DualEncoder. The token map (described text towers) integrates
    along the token
    embeddings from a baseline where every non-special, non-padding token is the pad token (BOS, EOS and padding
    stay, so they get exactly 0), summed over the embedding dimension.

    Args:
        n_steps: Integration steps.
        baseline: Image baseline: a scalar or a tensor broadcastable to the pixel values.
        internal_batch_size: Rows per forward pass (interpolated inputs are batched in chunks of this size).
    """

    name = "integrated_gradients"
    image_level: ImageLevel = "pixel"

    def __init__(self, n_steps: int = 32, baseline: float | torch.Tensor = 0.0, internal_batch_size: int = 64) -> None:
        self.n_steps = n_steps
        self.baseline = baseline
        self.internal_batch_size = internal_batch_size

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """IG summed over colour channels, (B, H, W)."""
        method = CaptumIntegratedGradients(_gradient_forward(model))
        attributions = method.attribute(
            pixel_values,
            baselines=self.baseline,
            additional_forward_args=(text_side,),
            n_steps=self.n_steps,
            internal_batch_size=self.internal_batch_size,
        )
        return attributions.sum(1).detach()

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """IG on token embeddings summed over the embedding dimension, (B, L)."""
        tower = text_tower(model, "a token map")
        baseline_ids = torch.where(_content_mask(tower, input_ids, attention_mask), tower.neutral_id, input_ids)
        method = LayerIntegratedGradients(_text_forward(model), tower.token_embedding)
        attributions = method.attribute(
            input_ids,
            baselines=baseline_ids,
            additional_forward_args=(attention_mask, image_side),
            n_steps=self.n_steps,
            internal_batch_size=self.internal_batch_size,
        )
        return attributions.sum(-1).detach() * attention_mask


class Occlusion(AttributionMethod):
    """Patch occlusion (Zeiler & Fergus 2014) with captum's FeatureAblation: ``f(x) − f(x with the patch set to
    baseline)`` per ViT patch (per cell of :func:`~cliptrace.explain.base.patch_grid` for models without a
    described image tower), the default baseline 0 in normalized space being the dataset mean colour.

    The token map (described text towers) replaces one non-special, non-padding token at a time by ``token_id``
    (the tower's neutral token, its pad token, by default) and records the drop; BOS, EOS and padding get 0.

    Args:
        baseline: Value an occluded patch takes, in normalized pixel space.
        token_id: Neutral token id for the text map; the tokenizer's pad token when ``None``.
        perturbations_per_eval: Occlusions evaluated in one forward pass.
    """

    name = "occlusion"
    image_level: ImageLevel = "patch"

    def __init__(self, baseline: float = 0.0, token_id: int | None = None, perturbations_per_eval: int = 16) -> None:
        self.baseline = baseline
        self.token_id = token_id
        self.perturbations_per_eval = perturbations_per_eval

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Logit drop per occluded patch, (B, gh, gw)."""
        rows, columns = patch_grid(model, pixel_values)
        height, width = pixel_values.shape[-2] // rows, pixel_values.shape[-1] // columns
        cells = torch.arange(rows * columns, device=pixel_values.device).reshape(rows, columns)
        feature_mask = cells.repeat_interleave(height, 0).repeat_interleave(width, 1)[None, None]
        attributions = FeatureAblation(_gradient_forward(model)).attribute(
            pixel_values,
            baselines=self.baseline,
            additional_forward_args=(text_side,),
            feature_mask=feature_mask,
            perturbations_per_eval=self.perturbations_per_eval,
        )
        return attributions[:, 0, ::height, ::width]

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Logit drop per replaced token, (B, L).

        Raises:
            ValueError: The neutral token would move the position the text tower pools at (e.g. it is the EOS).
        """
        tower = text_tower(model, "a token map")
        token_id = tower.neutral_id if self.token_id is None else self.token_id
        baseline_ids = torch.where(_content_mask(tower, input_ids, attention_mask), token_id, input_ids)
        if _moves_pool(tower, baseline_ids, input_ids, attention_mask):
            raise ValueError(f"token id {token_id} moves the text tower's pooling position; pass another token_id")
        attributions = FeatureAblation(_text_forward(model)).attribute(
            input_ids,
            baselines=baseline_ids,
            additional_forward_args=(attention_mask, image_side),
            feature_mask=torch.arange(input_ids.shape[1], device=input_ids.device)[None],
            perturbations_per_eval=self.perturbations_per_eval,
        )
        return attributions * attention_mask


class AttentionRollout(AttributionMethod):
    """Attention rollout (Abnar & Zuidema 2020): per layer the head-mean attention plus identity, row-normalized,
    multiplied across layers; the pooled token's row (CLS, EOS or last token) over patches or tokens, or the mean
    of the pooled rows (mean-pooled towers). With an attention-pool head (SigLIP) the row is the head's head-mean
    attention times the rollout.

    Does not depend on the text side (or image side): it reads attention only. Needs a described tower.
    """

    name = "attention_rollout"
    image_level: ImageLevel = "patch"
    needs_image_tower = True

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Rolled-out attention of CLS to each patch, (B, gh, gw)."""
        return self._map(model, "image", (pixel_values,), text_side)

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Rolled-out attention of the pooled token to each token, (B, L)."""
        return self._map(model, "text", (input_ids, attention_mask), image_side)

    @staticmethod
    def _map(model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor) -> torch.Tensor:
        embedding, attentions, _ = _attentions(model, modality, inputs, side, gradients=False)
        blocks, pool = _split_pool(embedding, [attention.mean(1) for attention in attentions])
        rollout = None
        for attention in blocks:
            mixed = attention + torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
            mixed = mixed / mixed.sum(-1, keepdim=True)
            rollout = mixed if rollout is None else mixed @ rollout
        return _source_map(_pooled_row(rollout, embedding, pool), modality, inputs, model)


class CheferRelevance(AttributionMethod):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, "Generic attention-model explainability for
    interpreting bi-modal and encoder-decoder transformers"), self-attention rule.

    ``R = I``; per layer ``Ā = E_h[(∇A ⊙ A)⁺]`` with ∇A the logit's gradient w.r.t. the attention
    probabilities, ``R ← R + Ā R``; the pooled token's row (CLS, EOS or last token), or the mean of the pooled rows
    (mean-pooled towers), over patches or tokens (causal and padding masks hold since masked probabilities are 0).
    With an attention-pool head (SigLIP) the row is the head's ``Ā`` (1 × N) times R. ``layers="last"`` reads the
    last attention's Ā alone (the head's, if any). Needs a described tower.

    Args:
        layers: ``"all"`` (the full rule) or ``"last"``.
    """

    name = "chefer"
    image_level: ImageLevel = "patch"
    needs_image_tower = True

    def __init__(self, layers: Literal["all", "last"] = "all") -> None:
        if layers not in ("all", "last"):
            raise ValueError(f"layers must be 'all' or 'last', got {layers!r}")
        self.layers = layers
        self.name = "chefer" if layers == "all" else "chefer_last"

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Relevance of each patch to CLS, (B, gh, gw)."""
        return self._map(model, "image", (pixel_values,), text_side)

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Relevance of each token to the pooled token, (B, L)."""
        return self._map(model, "text", (input_ids, attention_mask), image_side)

    def _map(self, model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor) -> torch.Tensor:
        embedding, attentions, gradients = _attentions(model, modality, inputs, side, gradients=True)
        weighted = [(gradient * attention).clamp(min=0).mean(1) for attention, gradient in zip(attentions, gradients)]
        blocks, pool = _split_pool(embedding, weighted)
        if self.layers == "last" and pool is not None:
            row = pool[:, 0, embedding.positions]
        else:
            if self.layers == "last":
                relevance = blocks[-1]
            else:
                relevance = torch.eye(blocks[0].shape[-1], dtype=blocks[0].dtype, device=blocks[0].device)
                for layer in blocks:
                    relevance = relevance + layer @ relevance
            row = _pooled_row(relevance, embedding, pool)
        return _source_map(row, modality, inputs, model)


class CheferRelevanceLast(CheferRelevance):
    """:class:`CheferRelevance` of the last attention only: ``E_h[(∇A ⊙ A)⁺]``, the pooled row."""

    def __init__(self, layers: Literal["all", "last"] = "last") -> None:
        super().__init__(layers)


class GradCAM(AttributionMethod):
    """Grad-CAM (Selvaraju et al. 2017) adapted to ViTs: activations A (B, N, D) are the last block's attention
    input (its ``norm1`` output; the block input in a post-LN block) at the patch tokens, ``w = mean_n ∂f/∂A_n``,
    map ``ReLU(Σ_d w_d A_{n,d})``. Needs a described tower.

    The last block's *output* is not used: with token pooling only its CLS (or EOS) state reaches the embedding,
    so its gradient is zero at every other token. The token map is the same on the text tower, averaged over
    non-padding tokens.
    """

    name = "gradcam"
    image_level: ImageLevel = "patch"
    needs_image_tower = True

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Grad-CAM per patch, (B, gh, gw)."""
        positions, activations, gradients = self._activations(model, "image", (pixel_values,), text_side)
        activations, gradients = activations[:, positions], gradients[:, positions]
        relevance = (gradients.mean(1, keepdim=True) * activations).sum(-1).clamp(min=0)
        return _source_map(relevance, "image", (pixel_values,), model)

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Grad-CAM per token, (B, L)."""
        _, activations, gradients = self._activations(model, "text", (input_ids, attention_mask), image_side)
        mask = attention_mask.to(gradients.dtype)[..., None]
        weights = (gradients * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return (weights * activations).sum(-1).clamp(min=0) * attention_mask

    @staticmethod
    def _activations(
        model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sources' positions, the last block's attention input (B, N, D) and the logit's gradient there."""
        with torch.enable_grad():
            embedding, traced, logit = _traced_logit(model, modality, inputs, side, "Grad-CAM")
            activations = traced.attention_inputs[-1]
            (gradient,) = torch.autograd.grad(logit.sum(), activations)
        return embedding.positions, activations.detach()[:, 0], gradient[:, 0]


class RandomMap(AttributionMethod):
    """Uniform random relevance in [0, 1) over the patch grid, the control baseline for faithfulness metrics.

    Each call draws from a fresh generator seeded with ``seed``, so equal inputs give equal maps. Token maps
    are zero at padding.

    Args:
        seed: Seed of the generator.
    """

    name = "random"
    image_level: ImageLevel = "patch"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Random map (B, gh, gw)."""
        shape = (pixel_values.shape[0], *patch_grid(model, pixel_values))
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(shape, generator=generator, dtype=pixel_values.dtype).to(pixel_values.device)

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Random map (B, L), zero at padding."""
        generator = torch.Generator().manual_seed(self.seed)
        values = torch.rand(input_ids.shape, generator=generator, dtype=image_side.dtype)
        return values.to(input_ids.device) * attention_mask


BASELINES: dict[str, type[AttributionMethod]] = {
    "gradient": Gradient,
    "gradient_x_input": GradientXInput,
    "patch_gradient": PatchGradient,
    "patch_gradient_x_input": PatchGradientXInput,
    "integrated_gradients": IntegratedGradients,
    "occlusion": Occlusion,
    "attention_rollout": AttentionRollout,
    "chefer": CheferRelevance,
    "chefer_last": CheferRelevanceLast,
    "gradcam": GradCAM,
    "random": RandomMap,
}


def make_baseline(name: str, **options: Any) -> AttributionMethod:
    """The baseline method registered as ``name``, built with ``options``.

    Raises:
        ValueError: ``name`` is not in :data:`BASELINES`.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; valid names: {', '.join(BASELINES)}")
    return BASELINES[name](**options)
