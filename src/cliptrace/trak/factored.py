r"""Factored TRAK features: projected per-example gradients of linear-type layers, without forming any gradient.

For a layer applied at positions t of one example, y_t = W x_t + b, the per-example gradient is
G = Σ_t δ_t [x_t; 1]ᵀ with δ_t = ∂f/∂y_t (the bias is the weight of an appended constant input 1). Its
Kronecker-structured projection is::

    P_o G P_iᵀ = Σ_t (P_o δ_t)(P_i [x_t; 1])ᵀ                          (k_o × k_i per example)

A forward hook projects the layer's inputs, a hook on the output's gradient projects δ_t, and one batched matrix
product forms the per-example sum. One forward pass plus the activation half of a backward pass (parameters are
frozen during it, so no weight-gradient product runs) give the features of a whole batch.

Supported layers and their (x_t, δ_t):

* ``nn.Linear``: input rows and output-gradient rows; bias through the appended 1.
* ``nn.Conv2d`` (groups = 1, zero padding, or ``"valid"``): the unfolded input patches (``F.unfold``) and the output
  gradient at each location; the weight is read as (out, in·kh·kw).
* ``nn.Embedding``: x_t is the one-hot id, so P_i x_t is column id_t of P_i (never formed); positions holding
  ``padding_idx`` get no gradient, as in torch. The weight (V, d) is read as its transpose (d outputs, V inputs).
* ``nn.LayerNorm``: its own exact form, ∂f/∂γ = Σ_t δ_t ⊙ x̂_t and ∂f/∂β = Σ_t δ_t (unprojected).

A side is projected only when it is wider than ``layer_dim``: P is then a seeded Rademacher matrix (layer_dim × d)
scaled by 1/√layer_dim, else the identity. The blocks of all layers are concatenated and a seeded CountSketch
(:class:`~cliptrace.trak.projection.CountSketchProjector`) maps them to ``proj_dim``. Every stage preserves inner
products in expectation, so ⟨features, features'⟩ estimates ⟨g, g'⟩ over the covered parameters, as the exact path's
dense projection does.

**Parameters outside supported layers** (raw ``nn.Parameter`` s such as CLIP's class and position embeddings,
projection matrices and logit scale, ``nn.MultiheadAttention``'s in- and out-projections, tied weights) follow
``other_parameters``: ``"factored"`` (default) forms their blocks from the ops that use them
(:mod:`cliptrace.trak.raw_parameters`; a parameter with a use it has no rule for takes its block from exact
per-example gradients, with a warning naming it), ``"exact"``
appends their per-example gradients from the exact ``torch.func`` path (one extra vectorized pass), ``"exclude"``
leaves them out and warns once, naming them and their share of the parameters, ``"error"`` refuses. A supported
layer whose parameters are selected but that never runs in the forward pass is an error: its weights may be used by
a code path that no hook sees.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
import torch.nn.functional as F

from cliptrace.notices import CliptraceWarning
from cliptrace.trak.batches import batch_size
from cliptrace.trak.clip_call import eager_attention
from cliptrace.trak.features import ExactFeaturizer, Featurizer, parameter_set_summary
from cliptrace.trak.gradients import per_example_gradients, select_parameters
from cliptrace.trak.outputs import ModelOutput
from cliptrace.trak.projection import CountSketchProjector, DenseProjector, IdentityProjector, Projector
from cliptrace.trak.raw_parameters import ParameterUses, RawParameter
from cliptrace.trak.settings import FEATURE_PATHS, OTHER_PARAMETER_POLICIES

if TYPE_CHECKING:
    from cliptrace.trak.kfac import LayerWhitening


def has_batch_outputs(output: ModelOutput) -> bool:
    """Whether the model-output function defines the batched form the factored path needs."""
    return type(output).batch_outputs is not ModelOutput.batch_outputs


def side_projection(width: int, layer_dim: int, kind: str, seed: int) -> torch.Tensor | None:
    """The (layer_dim × width) projection of one side of a layer, scaled; None (identity) when width ≤ layer_dim."""
    if width <= layer_dim:
        return None
    return DenseProjector(width, layer_dim, kind, seed).matrix().T.contiguous()


class FactoredLayer:
    """One supported module whose parameters are differentiated, and how its block of features is formed.

    Attributes:
        name: The module's qualified name.
        module: The module.
        parameter_names: Qualified names of the selected parameters it owns (weight first).
        out_projection: P_o (k_o × d_o), or None for the identity.
        in_projection: P_i (k_i × d_i, plus one column for the bias), or None for the identity.
        whitening: The layer's K-FAC / EK-FAC whitening (:mod:`cliptrace.trak.kfac`), applied before the side
            projections; None for plain gradients.
        size: Length of the layer's block of features.
    """

    def __init__(self, name: str, module: nn.Module, weight: str | None, bias: str | None, layer_dim: int,
                 kind: str, seed: int) -> None:
        self.name, self.module = name, module
        self.parameter_names = [p for p in (weight, bias) if p is not None]
        self.has_weight, self.has_bias = weight is not None, bias is not None
        self.whitening: LayerWhitening | None = None
        if isinstance(module, nn.LayerNorm):
            self.out_projection = self.in_projection = None
            self.size = module.normalized_shape[0] * len(self.parameter_names)
            return
        d_out, d_in = self.widths()
        self.out_projection = side_projection(d_out, layer_dim, kind, seed * 2)
        self.in_projection = side_projection(d_in + self.has_bias, layer_dim, kind, seed * 2 + 1)
        k_out = d_out if self.out_projection is None else layer_dim
        k_in = d_in + self.has_bias if self.in_projection is None else layer_dim
        self.size = k_out * k_in

    def widths(self) -> tuple[int, int]:
        """(d_out, d_in) of the layer read as a linear map (without the bias column)."""
        module = self.module
        if isinstance(module, nn.Linear):
            return module.out_features, module.in_features
        if isinstance(module, nn.Conv2d):
            return module.out_channels, module.in_channels * math.prod(module.kernel_size)
        if isinstance(module, nn.Embedding):
            return module.embedding_dim, module.num_embeddings
        raise TypeError(f"{type(module).__name__} is not a supported layer")

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the side projections and the whitening."""
        for side in ("out_projection", "in_projection"):
            matrix = getattr(self, side)
            if matrix is not None:
                setattr(self, side, matrix.to(device, dtype))
        if self.whitening is not None:
            self.whitening = self.whitening.to(device, dtype)

    def keep(self, inputs: tuple[Any, ...], batch: int, dtype: torch.dtype) -> torch.Tensor:
        """What the forward pass must leave for the block: P_i [x_t; 1] (B, T, k_i), x̂_t for a LayerNorm, or the
        whitened rows [x_t; 1] Q_A (B, T, d_i + 1) for a linear layer with a whitening."""
        module = self.module
        if isinstance(module, nn.LayerNorm):
            x = inputs[0]
            rows = F.layer_norm(x.detach().to(dtype), module.normalized_shape, eps=module.eps)
            return _per_example(rows, batch, self.name).reshape(batch, -1, rows.shape[-1])
        if isinstance(module, nn.Embedding):
            ids = _per_example(inputs[0], batch, self.name).reshape(batch, -1)
            if self.in_projection is None:
                rows = F.one_hot(ids, module.num_embeddings).to(dtype)
            else:
                rows = self.in_projection.T[ids]
            if module.padding_idx is not None:
                rows = rows * (ids != module.padding_idx).unsqueeze(-1).to(dtype)
            return rows
        rows = self.rows(inputs, batch, dtype)
        if self.whitening is not None:
            return self.with_bias(rows) @ self.whitening.in_basis
        if self.in_projection is None:
            return self.with_bias(rows)
        projection = self.in_projection
        if not self.has_bias:
            return rows @ projection.T
        return rows @ projection[:, :-1].T + projection[:, -1]

    def rows(self, inputs: tuple[Any, ...], batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The inputs x_t (B, T, d_i) of a Linear or Conv2d layer (unfolded patches for a convolution)."""
        x = inputs[0].detach()
        if isinstance(self.module, nn.Conv2d):
            module = self.module
            padding = 0 if module.padding == "valid" else module.padding  # "valid" (HF SigLIP's patches) pads nothing
            x = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride).transpose(1, 2)
        return _per_example(x.to(dtype), batch, self.name).reshape(batch, -1, x.shape[-1])

    def with_bias(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` with the bias's constant input 1 appended when the layer's bias is differentiated."""
        return torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], -1) if self.has_bias else rows

    def deltas(self, grad: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The output gradients δ_t (B, T, d_o) of the layer."""
        if isinstance(self.module, nn.Conv2d):
            grad = grad.flatten(2).transpose(1, 2)
        return grad.to(dtype).reshape(batch, -1, grad.shape[-1])

    def block(self, kept: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's (B, size) features from what the forward pass kept and the gradient of its output."""
        deltas = self.deltas(grad, kept.shape[0], dtype)
        whitening = self.whitening
        if isinstance(self.module, nn.LayerNorm):
            parts = ([(deltas * kept).sum(1)] if self.has_weight else []) + ([deltas.sum(1)] if self.has_bias else [])
            block = torch.cat(parts, 1)
            return block if whitening is None else block * whitening.inverse_sqrt
        if whitening is not None and not isinstance(self.module, nn.Embedding):
            gradient = torch.bmm((deltas @ whitening.out_basis).transpose(1, 2), kept) * whitening.inverse_sqrt
            if self.out_projection is not None:
                gradient = self.out_projection @ gradient
            if self.in_projection is not None:
                gradient = gradient @ self.in_projection.T
            return gradient.flatten(1)
        if self.out_projection is not None:
            deltas = deltas @ self.out_projection.T
        block = torch.bmm(deltas.transpose(1, 2), kept).flatten(1)
        return block if whitening is None else block * whitening.inverse_sqrt


def _per_example(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``tensor`` with a leading dimension of ``batch``, expanding a broadcast leading 1 (e.g. position ids)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(
        f"layer {name!r} ran on a tensor of shape {tuple(tensor.shape)}, whose leading dimension is not the batch size "
        f"{batch}: the factored path needs batch-first layers; exclude it with parameters= or use the exact path"
    )


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and (isinstance(module.padding, tuple)
                                                                          or module.padding == "valid")
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.sparse
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1 and module.elementwise_affine
    return isinstance(module, nn.Linear)


def find_layers(module: nn.Module, names: Sequence[str], layer_dim: int, kind: str, seed: int) -> list[FactoredLayer]:
    """The supported layers owning any of the parameters ``names`` (module order), each with its side projections.

    A weight shared by several modules, and layers inside ``nn.MultiheadAttention`` (which uses its weights
    without calling them), are left to the ``other_parameters`` policy.
    """
    selected = set(names)
    owners: dict[int, int] = {}
    for sub in module.modules():
        for parameter in sub.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    inside_attention = {id(m) for sub in module.modules() if isinstance(sub, nn.MultiheadAttention)
                        for m in sub.modules()}
    layers: list[FactoredLayer] = []
    for prefix, sub in module.named_modules():
        if not _supported(sub) or id(sub) in inside_attention:
            continue
        own = {local: p for local, p in sub.named_parameters(recurse=False)}
        if any(owners[id(p)] > 1 for p in own.values()):
            continue
        qualified = {local: f"{prefix}.{local}" if prefix else local for local in own}
        weight = qualified["weight"] if qualified.get("weight") in selected else None
        bias = qualified["bias"] if qualified.get("bias") in selected else None
        if weight is None and not (isinstance(sub, nn.LayerNorm) and bias is not None):
            continue
        layers.append(FactoredLayer(prefix, sub, weight, bias, layer_dim, kind, seed * 1_000_003 + len(layers)))
    return layers


class FactoredFeaturizer(Featurizer):
    """TRAK features from hooks on linear-type layers: the cost of about one training step per batch.

    Args:
        module: The model (a DualEncoder, HF ``CLIPModel``, open_clip-style module, or a classifier).
        output: The model-output function; it must define ``batch_outputs``.
        proj_dim: Feature dimension; ``None`` keeps the concatenated per-layer blocks (no final sketch).
        layer_dim: Width each side of a layer is projected to (when wider).
        projection: ``"rademacher"`` or ``"gaussian"`` side projections.
        seed: Seed of the side projections and the final sketch.
        parameters: Parameter names or globs to differentiate (default: all trainable parameters).
        other_parameters: ``"factored"``, ``"exclude"``, ``"exact"`` or ``"error"`` for selected parameters outside
            supported layers (see the module's docstring).
        autocast: Run the forward and backward passes under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16`` on a GPU); the side projections, per-layer sums and the sketch stay in float32.
        chunk_size: Examples per vectorized call of the exact path for ``other_parameters="exact"``.

    Raises:
        ValueError: Unknown policy, no supported layer among the selected parameters (unless ``"factored"``), or
            leftovers with ``"error"``.
    """

    def __init__(
        self,
        module: nn.Module,
        output: ModelOutput,
        proj_dim: int | None = 2048,
        layer_dim: int = 32,
        projection: str = "rademacher",
        seed: int = 0,
        parameters: Sequence[str] | None = None,
        other_parameters: str = "factored",
        autocast: torch.dtype | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if not has_batch_outputs(output):
            raise ValueError(f"{type(output).__name__} defines no batch_outputs(): the factored path needs it; use the "
                             f"exact path")
        if other_parameters not in OTHER_PARAMETER_POLICIES:
            raise ValueError(f"other_parameters must be one of {OTHER_PARAMETER_POLICIES}, got {other_parameters!r}")
        if layer_dim < 1:
            raise ValueError(f"layer_dim must be positive, got {layer_dim}")
        self.module, self.output = module, output
        self.layer_dim, self.projection, self.seed = layer_dim, projection, seed
        self.other_parameters, self.autocast, self.chunk_size = other_parameters, autocast, chunk_size
        selected = select_parameters(module, parameters)
        self.layers = find_layers(module, selected, layer_dim, projection, seed)
        covered = {name for layer in self.layers for name in layer.parameter_names}
        self.other_names = [name for name in selected if name not in covered]
        if not self.layers and other_parameters != "factored":
            raise ValueError(f"none of the {len(selected)} selected parameters of {type(module).__name__} is in a "
                             f"layer the factored path supports (Linear, Conv2d, Embedding, LayerNorm): use the exact "
                             f"path, or other_parameters='factored'")
        if self.other_names and other_parameters == "error":
            raise ValueError(f"parameters outside supported layers: {self.other_names}; pass other_parameters="
                             f"'exclude' or 'exact', or leave them out with parameters=")
        named = dict(module.named_parameters())
        self.raw = [RawParameter(name, named[name], lambda width, side: side_projection(width, layer_dim, projection,
                                                                                        side),
                                 seed * 1_000_003 + len(self.layers) + i)
                    for i, name in enumerate(self.other_names)] if other_parameters == "factored" else []
        if self.other_names and other_parameters == "exclude":
            _warn_excluded(module, self.other_names, selected, "other_parameters='exclude'")
        self.parameter_names = selected if other_parameters in ("exact", "factored") else [
            n for n in selected if n in covered]
        self.other_size = sum(named[n].numel() for n in self.other_names) if other_parameters == "exact" else 0
        self._sketch_dim = proj_dim
        self._build_projector()
        self.whitening: dict[str, Any] | None = None
        self._placed: tuple[torch.device, torch.dtype] | None = None
        self._warned_exact: set[str] = set()

    def _build_projector(self) -> None:
        """The final sketch over the concatenated blocks (layers, raw parameters, exact leftovers)."""
        self.input_dim = sum(layer.size for layer in self.layers) + sum(raw.size for raw in self.raw) + self.other_size
        self.projector: Projector = (IdentityProjector(self.input_dim) if self._sketch_dim is None
                                     else CountSketchProjector(self.input_dim, self._sketch_dim, self.seed))
        self.proj_dim = self.projector.proj_dim

    def settings(self) -> dict[str, Any]:
        return {
            "featurizer": "factored",
            "layer_dim": self.layer_dim,
            "side_projection": self.projection,
            "seed": self.seed,
            "projection": self.projector.settings(),
            "parameters": parameter_set_summary(self.parameter_names),
            "other_parameters": self.other_parameters,
            "output": self.output.settings(),
        } | ({"whitening": self.whitening} if self.whitening is not None else {})

    def layer_slices(self) -> dict[str, slice]:
        """Where each layer's and raw parameter's block lies in the unsketched features (``proj_dim=None``);
        ``"other"`` for the exact path's leftovers."""
        slices, start = {}, 0
        for block in (*self.layers, *self.raw):
            slices[block.name] = slice(start, start + block.size)
            start += block.size
        slices["other"] = slice(start, start + self.other_size)
        return slices

    def place(self, device: torch.device) -> torch.dtype:
        """Move the layers' projections and whitenings to ``device`` in the features' dtype; returns that dtype."""
        dtype = torch.float64 if next(self.module.parameters()).dtype == torch.float64 else torch.float32
        if self._placed != (device, dtype):
            for block in (*self.layers, *self.raw):
                block.to(device, dtype)
            self._placed = (device, dtype)
        return dtype

    def whiten(self, whitenings: dict[str, LayerWhitening], description: dict[str, Any]) -> None:
        """Whiten every layer's gradient before its side projections (``description`` joins :meth:`settings`).

        Raw parameters (``other_parameters="factored"``) have no whitening: they leave the features, with a warning
        naming them.

        Raises:
            ValueError: A layer without a whitening, or parameters outside the layers (``other_parameters="exact"``).
        """
        missing = [layer.name for layer in self.layers if layer.name not in whitenings]
        if missing or self.other_size:
            raise ValueError(f"whitening needs every featurized parameter in a hooked layer; missing layers "
                             f"{missing}, {self.other_size} parameters outside them (other_parameters='exact')")
        if self.raw:
            names = [raw.name for raw in self.raw]
            _warn_excluded(self.module, names, self.parameter_names, "the K-FAC whitening")
            self.parameter_names = [name for name in self.parameter_names if name not in names]
            self.raw = []
            self._build_projector()
        for layer in self.layers:
            layer.whitening = whitenings[layer.name]
        self.whitening = description
        self._placed = None

    def features(self, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = indices.device
        dtype = self.place(device)
        count = batch_size(batch)
        blocks: dict[str, torch.Tensor] = {}

        def add(name: str, block: torch.Tensor) -> None:
            blocks[name] = blocks[name] + block if name in blocks else block

        def add_block(layer: FactoredLayer, kept: torch.Tensor, grad: torch.Tensor) -> None:
            add(layer.name, layer.block(kept, grad, dtype).to(dtype))

        uses = ParameterUses(self.module, self.raw, count, dtype, lambda raw, block: add(raw.name, block.to(dtype)))
        weights = self.hooked_backward(batch, indices, lambda layer, inputs: layer.keep(inputs, count, dtype),
                                       add_block, _watching(uses) if self.raw else nullcontext())
        without_rule = uses.without_rule()
        if without_rule:
            blocks.update(self._exact_blocks(without_rule, batch, indices, dtype))
        parts = [blocks[block.name] if block.name in blocks else torch.zeros(count, block.size, dtype=dtype,
                                                                             device=device)
                 for block in (*self.layers, *self.raw)]
        if self.other_size:
            with eager_attention(self.module):
                parts.append(per_example_gradients(self.output, self.module, self.other_names, batch, indices,
                                                   self.chunk_size).to(dtype))
        features = self.projector.project(torch.cat(parts, 1))
        return features, weights.to(features.dtype)

    def _exact_blocks(self, names: list[str], batch: Any, indices: torch.Tensor,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Blocks of raw parameters that the op rules did not cover, from exact per-example gradients (warned once)."""
        if set(names) - self._warned_exact:
            self._warned_exact.update(names)
            _warn_excluded(self.module, names, self.parameter_names, "uses the factored path has no rule for",
                           "take their blocks from exact per-example gradients (one more vectorized pass) for")
        with eager_attention(self.module):
            gradients = per_example_gradients(self.output, self.module, names, batch, indices, self.chunk_size)
        named, raw = dict(self.module.named_parameters()), {item.name: item for item in self.raw}
        blocks, start = {}, 0
        for name in names:
            size = named[name].numel()
            flat = gradients[:, start:start + size].to(dtype)
            blocks[name] = raw[name].block(flat.reshape(flat.shape[0], *named[name].shape))
            start += size
        return blocks

    @staticmethod
    def _projection_precision(device: torch.device) -> torch.autocast:
        """Side projections and sums run outside autocast, in the features' dtype (faster and more accurate than
        bf16 projections on an H200: 1836 vs 1457 ViT-B/32 examples/s, see benchmarks/RESULTS.md)."""
        return torch.autocast(device.type, enabled=False)

    def hooked_backward(self, batch: Any, indices: torch.Tensor, keep: Callable[[FactoredLayer, tuple[Any, ...]], Any],
                        on_gradient: Callable[[FactoredLayer, Any, torch.Tensor], None],
                        forward_context: AbstractContextManager[Any] | None = None) -> torch.Tensor:
        """One forward and backward pass of the model output over ``batch`` with parameters frozen and every layer
        hooked: ``keep(layer, inputs)`` runs when the layer runs, ``on_gradient(layer, kept, output_gradient)`` when
        its output's gradient arrives (both outside autocast); ``forward_context`` is active over the forward pass
        only. Returns the loss weights Q (B,)."""
        autocast = (torch.autocast(indices.device.type, dtype=self.autocast) if self.autocast is not None
                    else nullcontext())
        with _frozen(self.module), self._hooks(batch_size(batch), keep, on_gradient), torch.enable_grad(), autocast:
            with forward_context or nullcontext():
                values, weights = self.output.batch_outputs(self.module, batch, indices)
            if not values.requires_grad:
                raise RuntimeError("the model output does not depend on any hooked layer: nothing to differentiate")
            values.sum().backward()
        return weights

    @contextmanager
    def _hooks(self, batch: int, keep: Callable[[FactoredLayer, tuple[Any, ...]], Any],
               on_gradient: Callable[[FactoredLayer, Any, torch.Tensor], None]) -> Iterator[None]:
        ran: set[str] = set()

        def forward_hook(layer: FactoredLayer):
            def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                ran.add(layer.name)
                with self._projection_precision(output.device):
                    kept = keep(layer, inputs)
                output = _per_example(output, batch, layer.name)
                if not output.requires_grad:
                    output = output.detach().requires_grad_()

                def gradient_hook(grad: torch.Tensor) -> None:
                    with self._projection_precision(grad.device):  # autograd runs hooks in its own thread
                        on_gradient(layer, kept, grad)

                output.register_hook(gradient_hook)
                return output
            return hook

        handles = [layer.module.register_forward_hook(forward_hook(layer)) for layer in self.layers]
        try:
            yield
            silent = [layer.name for layer in self.layers if layer.name not in ran]
            if silent:
                raise RuntimeError(
                    f"layers {silent} hold selected parameters but did not run in the forward pass (their weights may "
                    f"be used without calling them): leave them out with parameters= or use the exact path"
                )
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _watching(uses: ParameterUses) -> Iterator[None]:
    """Activate ``uses`` with torch's fused attention fast paths off (they would bypass the watched ops)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with uses:
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _warn_excluded(module: nn.Module, excluded: Sequence[str], selected: Sequence[str], reason: str,
                   action: str = "leave out") -> None:
    """Warn that the factored features ``action`` the ``excluded`` parameters, with their share of ``selected``."""
    named = dict(module.named_parameters())
    count, total = sum(named[n].numel() for n in excluded), sum(named[n].numel() for n in selected)
    warnings.warn(f"factored features {action} {len(excluded)} parameters ({count:,} of {total:,} selected values, "
                  f"{100 * count / total:.1f} %) because of {reason}: {', '.join(excluded)}", CliptraceWarning,
                  stacklevel=3)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter for the block (no weight gradients), then restore the flags."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def make_featurizer(
    features: str,
    module: nn.Module,
    output: ModelOutput,
    proj_dim: int | None = 2048,
    projection: str = "rademacher",
    seed: int = 0,
    parameters: Sequence[str] | None = None,
    chunk_size: int | None = None,
    **factored_options: Any,
) -> Featurizer:
    """The featurizer of a feature path: ``"factored"``, ``"exact"``, or ``"auto"``.

    ``"auto"`` takes the factored path wherever it applies: a projection is asked for (``proj_dim`` is not None)
    and the model-output function has a batched form; else the exact path.

    Args:
        features: The path.
        module, output, proj_dim, projection, seed, parameters, chunk_size: As for both featurizers.
        **factored_options: ``layer_dim``, ``other_parameters``, ``autocast`` of :class:`FactoredFeaturizer`.
    """
    if features not in FEATURE_PATHS:
        raise ValueError(f"features must be one of {FEATURE_PATHS}, got {features!r}")
    if features == "auto":
        features = "factored" if proj_dim is not None and has_batch_outputs(output) else "exact"
    if features == "factored":
        return FactoredFeaturizer(module, output, proj_dim=proj_dim, projection=projection, seed=seed,
                                  parameters=parameters, chunk_size=chunk_size, **factored_options)
    return ExactFeaturizer(module, output, proj_dim=proj_dim, projection=projection, seed=seed, parameters=parameters,
                           chunk_size=chunk_size)

