"""Baseline attribution methods: gradients, integrated gradients, occlusion, attention rollout, Chefer relevance,
Grad-CAM and a random control, one class per algorithm as in captum.

Every method explains :func:`~cliptrace.explain.base.image_logit` (image maps) or
:func:`~cliptrace.explain.base.text_logit` (text maps), row by row: row b is explained w.r.t. its own text side
(or image side). Methods that look inside the towers need an :class:`~cliptrace.models.HFCLIP`; they hook its
modules for one call only and leave parameters, ``requires_grad`` flags and the attention implementation as
they were. Token maps are zero at padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from captum.attr import FeatureAblation, InputXGradient, LayerIntegratedGradients, Saliency
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
import torch
from torch import nn

from cliptrace.explain.base import AttributionMethod, ImageLevel, image_logit, patch_grid, require_hf_clip, text_logit
from cliptrace.models.base import DualEncoder
from cliptrace.models.hf_clip import HFCLIP
from cliptrace.trak.clip_call import eager_attention

Modality = Literal["image", "text"]
Inputs = tuple[torch.Tensor, ...]  # (pixel_values,) or (input_ids, attention_mask)


@contextmanager
def _forward_hooks(hooks: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Register forward hooks for the block and remove them afterwards, also on error."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _recorder(store: list[torch.Tensor], index: int | None = None, leaf: bool = False) -> Callable[..., Any]:
    """A forward hook appending the module's output (its ``index``-th item if given) to ``store``.

    With ``leaf`` the output is replaced by a detached copy that requires grad, so gradients w.r.t. it exist
    (and everything downstream is differentiable) whatever the parameters' ``requires_grad`` flags.
    """

    def hook(module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        value = output if index is None else output[index]
        if leaf:
            value = value.detach().requires_grad_(True)
        store.append(value)
        return value if leaf else None

    return hook


def _input_embedding(clip: HFCLIP, modality: Modality) -> nn.Module:
    """The patch-embedding convolution or the token-embedding table."""
    if modality == "image":
        return clip.model.vision_model.embeddings.patch_embedding
    return clip.model.text_model.embeddings.token_embedding


def _layers(clip: HFCLIP, modality: Modality) -> nn.ModuleList:
    """The encoder blocks of one tower."""
    tower = clip.model.vision_model if modality == "image" else clip.model.text_model
    return tower.encoder.layers


def _logit(clip: HFCLIP, modality: Modality, inputs: Inputs, side: torch.Tensor) -> torch.Tensor:
    """``image_logit(clip, *inputs, side)`` or ``text_logit(clip, *inputs, side)``."""
    return image_logit(clip, *inputs, side) if modality == "image" else text_logit(clip, *inputs, side)


def _pooled_positions(clip: HFCLIP, input_ids: torch.Tensor) -> torch.Tensor:
    """The token position the text tower pools at, per row (as HF CLIP does: first EOS, or the highest id)."""
    eos = clip.model.text_model.eos_token_id
    if eos == 2:
        return input_ids.argmax(-1)
    return (input_ids == eos).int().argmax(-1)


def _pooled_row(matrix: torch.Tensor, clip: HFCLIP, modality: Modality, inputs: Inputs) -> torch.Tensor:
    """The pooled token's row of (B, N, N) token-to-token scores as a map: (B, gh, gw) over patches or (B, L)."""
    if modality == "image":
        rows, columns = patch_grid(clip, inputs[0])
        return matrix[:, 0, 1:].reshape(-1, rows, columns)
    input_ids, attention_mask = inputs
    positions = _pooled_positions(clip, input_ids)
    return matrix[torch.arange(matrix.shape[0]), positions] * attention_mask


def _special_mask(clip: HFCLIP, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """True at tokens that may be attributed: not padding and not a special token (BOS, EOS, pad)."""
    specials = torch.tensor(clip.tokenizer.all_special_ids, device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, specials)


def _embedding_gradient(
    model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input embeddings and the logit's gradient w.r.t. them.

    Image: the patch-embedding conv output (B, D, gh, gw); text: the token embeddings (B, L, D), before
    position embeddings are added.
    """
    clip = require_hf_clip(model, "an embedding-space map")
    store: list[torch.Tensor] = []
    with _forward_hooks({_input_embedding(clip, modality): _recorder(store, leaf=True)}), torch.enable_grad():
        logit = _logit(clip, modality, inputs, side)
        (gradient,) = torch.autograd.grad(logit.sum(), store)
    return store[0].detach(), gradient


def _embedding_map(
    model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor, times_input: bool
) -> torch.Tensor:
    """Per patch (B, gh, gw) or token (B, L): ‖∂f/∂e‖₂, or Σ_d e·∂f/∂e with ``times_input``."""
    embeddings, gradient = _embedding_gradient(model, modality, inputs, side)
    dim = 1 if modality == "image" else -1
    relevance = (embeddings * gradient).sum(dim) if times_input else gradient.norm(dim=dim)
    return relevance if modality == "image" else relevance * inputs[1]


def _attentions(
    model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor, gradients: bool
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
    """Every layer's attention probabilities (B, heads, N, N) under eager attention, and with ``gradients``
    the logit's gradient w.r.t. each of them."""
    clip = require_hf_clip(model, "an attention map")
    attentions: list[torch.Tensor] = []
    embeddings: list[torch.Tensor] = []
    hooks = {layer.self_attn: _recorder(attentions, index=1) for layer in _layers(clip, modality)}
    hooks[_input_embedding(clip, modality)] = _recorder(embeddings, leaf=True)
    with eager_attention(clip), _forward_hooks(hooks), torch.set_grad_enabled(gradients):
        logit = _logit(clip, modality, inputs, side)
        grads = torch.autograd.grad(logit.sum(), attentions) if gradients else None
    return [attention.detach() for attention in attentions], grads


def _gradient_forward(model: DualEncoder) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(pixel_values, text_side) -> image_logit``: the forward function handed to captum."""
    return lambda pixel_values, text_side: image_logit(model, pixel_values, text_side)


def _text_forward(model: DualEncoder) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(input_ids, attention_mask, image_side) -> text_logit``: the forward function handed to captum."""
    return lambda input_ids, attention_mask, image_side: text_logit(model, input_ids, attention_mask, image_side)


class Gradient(AttributionMethod):
    """Vanilla gradient saliency (Simonyan, Vedaldi & Zisserman 2014): ``max_c |∂f/∂x_c|`` per pixel.

    Works for any DualEncoder. The token map (HFCLIP) is ``‖∂f/∂e‖₂`` of each token embedding e.
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

    Works for any DualEncoder. The token map (HFCLIP) is ``Σ_d e_d ∂f/∂e_d`` of each token embedding e.
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
    i.e. how fast the logit moves when the patch's embedding is perturbed. HFCLIP only.

    The token map is the same norm on token embeddings.
    """

    name = "patch_gradient"
    image_level: ImageLevel = "patch"
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
    output; class and position embeddings excluded). HFCLIP only. The token map is the same on token embeddings.
    """

    name = "patch_gradient_x_input"
    times_input = True


class IntegratedGradients(AttributionMethod):
    """Integrated gradients (Sundararajan, Taly & Yan 2017) with captum, per pixel summed over colour channels.

    The image baseline is ``baseline`` in normalized pixel space (0: the dataset mean colour); the maps sum to
    about ``f(x) − f(baseline)``. Works for any DualEncoder. The token map (HFCLIP) integrates along the token
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
        clip = require_hf_clip(model, "a token map")
        baseline_ids = torch.where(
            _special_mask(clip, input_ids, attention_mask), clip.tokenizer.pad_token_id, input_ids
        )
        method = LayerIntegratedGradients(_text_forward(clip), _input_embedding(clip, "text"))
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
    baseline)`` per ViT patch, the default baseline 0 in normalized space being the dataset mean colour. HFCLIP.

    The token map replaces one non-special, non-padding token at a time by ``token_id`` (the pad token by
    default) and records the drop; BOS, EOS and padding get 0.

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
        patch = pixel_values.shape[-1] // columns
        cells = torch.arange(rows * columns, device=pixel_values.device).reshape(rows, columns)
        feature_mask = cells.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[None, None]
        attributions = FeatureAblation(_gradient_forward(model)).attribute(
            pixel_values,
            baselines=self.baseline,
            additional_forward_args=(text_side,),
            feature_mask=feature_mask,
            perturbations_per_eval=self.perturbations_per_eval,
        )
        return attributions[:, 0, ::patch, ::patch]

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Logit drop per replaced token, (B, L).

        Raises:
            ValueError: The neutral token would move the position the text tower pools at (e.g. it is the EOS).
        """
        clip = require_hf_clip(model, "a token map")
        token_id = clip.tokenizer.pad_token_id if self.token_id is None else self.token_id
        baseline_ids = torch.where(_special_mask(clip, input_ids, attention_mask), token_id, input_ids)
        if not torch.equal(_pooled_positions(clip, baseline_ids), _pooled_positions(clip, input_ids)):
            raise ValueError(f"token id {token_id} moves the text tower's pooling position; pass another token_id")
        attributions = FeatureAblation(_text_forward(clip)).attribute(
            input_ids,
            baselines=baseline_ids,
            additional_forward_args=(attention_mask, image_side),
            feature_mask=torch.arange(input_ids.shape[1], device=input_ids.device)[None],
            perturbations_per_eval=self.perturbations_per_eval,
        )
        return attributions * attention_mask


class AttentionRollout(AttributionMethod):
    """Attention rollout (Abnar & Zuidema 2020): per layer the head-mean attention plus identity, row-normalized,
    multiplied across layers; the CLS row over patches (image) or the pooled EOS row over tokens (text).

    Does not depend on the text side (or image side): it reads attention only. HFCLIP; runs under eager attention.
    """

    name = "attention_rollout"
    image_level: ImageLevel = "patch"

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
        attentions, _ = _attentions(model, modality, inputs, side, gradients=False)
        rollout = None
        for attention in attentions:
            mixed = attention.mean(1) + torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
            mixed = mixed / mixed.sum(-1, keepdim=True)
            rollout = mixed if rollout is None else mixed @ rollout
        return _pooled_row(rollout, require_hf_clip(model, "an attention map"), modality, inputs)


class CheferRelevance(AttributionMethod):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, "Generic attention-model explainability for
    interpreting bi-modal and encoder-decoder transformers"), self-attention rule.

    ``R = I``; per layer ``Ā = E_h[(∇A ⊙ A)⁺]`` with ∇A the logit's gradient w.r.t. the attention
    probabilities, ``R ← R + Ā R``; the CLS row over patches (image) or the pooled EOS row over tokens (text;
    causal and padding masks hold since masked probabilities are 0). ``layers="last"`` reads the last layer's Ā
    alone. HFCLIP; runs under eager attention.

    Args:
        layers: ``"all"`` (the full rule) or ``"last"``.
    """

    name = "chefer"
    image_level: ImageLevel = "patch"

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
        attentions, gradients = _attentions(model, modality, inputs, side, gradients=True)
        weighted = [(gradient * attention).clamp(min=0).mean(1) for attention, gradient in zip(attentions, gradients)]
        if self.layers == "last":
            relevance = weighted[-1]
        else:
            relevance = torch.eye(weighted[0].shape[-1], dtype=weighted[0].dtype, device=weighted[0].device)
            for layer in weighted:
                relevance = relevance + layer @ relevance
        return _pooled_row(relevance, require_hf_clip(model, "an attention map"), modality, inputs)


class CheferRelevanceLast(CheferRelevance):
    """:class:`CheferRelevance` of the last layer only: ``E_h[(∇A ⊙ A)⁺]`` of the last block, CLS/EOS row."""

    def __init__(self, layers: Literal["all", "last"] = "last") -> None:
        super().__init__(layers)


class GradCAM(AttributionMethod):
    """Grad-CAM (Selvaraju et al. 2017) adapted to ViTs: activations A (B, N, D) are the last encoder block's
    ``layer_norm1`` output at the patch tokens, ``w = mean_n ∂f/∂A_n``, map ``ReLU(Σ_d w_d A_{n,d})``. HFCLIP.

    The last block's *output* is not used: only its CLS (or EOS) state reaches the embedding, so its gradient is
    zero at every other token. The token map is the same on the text tower, averaged over non-padding tokens.
    """

    name = "gradcam"
    image_level: ImageLevel = "patch"

    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Grad-CAM per patch, (B, gh, gw)."""
        activations, gradients = self._activations(model, "image", (pixel_values,), text_side)
        weights = gradients[:, 1:].mean(1, keepdim=True)
        relevance = (weights * activations[:, 1:]).sum(-1).clamp(min=0)
        return relevance.reshape(-1, *patch_grid(model, pixel_values))

    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Grad-CAM per token, (B, L)."""
        activations, gradients = self._activations(model, "text", (input_ids, attention_mask), image_side)
        mask = attention_mask.to(gradients.dtype)[..., None]
        weights = (gradients * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return (weights * activations).sum(-1).clamp(min=0) * attention_mask

    @staticmethod
    def _activations(
        model: DualEncoder, modality: Modality, inputs: Inputs, side: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        clip = require_hf_clip(model, "Grad-CAM")
        activations: list[torch.Tensor] = []
        embeddings: list[torch.Tensor] = []
        hooks = {
            _input_embedding(clip, modality): _recorder(embeddings, leaf=True),
            _layers(clip, modality)[-1].layer_norm1: _recorder(activations),
        }
        with _forward_hooks(hooks), torch.enable_grad():
            logit = _logit(clip, modality, inputs, side)
            (gradient,) = torch.autograd.grad(logit.sum(), activations)
        return activations[0].detach(), gradient


class RandomMap(AttributionMethod):
    """Uniform random relevance in [0, 1), the control baseline for faithfulness metrics; HFCLIP (patch grid).

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
