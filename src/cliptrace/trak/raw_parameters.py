r"""Factored features of parameters used outside supported layers, found by watching the ops that use them.

Raw ``nn.Parameter`` s (open_clip's ``visual.proj``, ``text_projection``, position and class embeddings,
``logit_scale``; ``nn.MultiheadAttention``'s packed in-projection and out-projection) are used by plain tensor ops
that no module hook sees. :class:`ParameterUses`, a ``TorchFunctionMode`` active during the forward pass, follows
each such parameter P through batch-free ops (``.to``, ``view``, ``exp``, slicing, ...: recorded so that a gradient
can be carried back to P by ``torch.func.vjp``) to the op where it meets the batch, and applies one of three rules:

* **linear use** ``F.linear(x, P, b)``, ``x @ P``: a linear layer with weight P (or Pᵀ), formed like a hooked
  ``nn.Linear``: keep the projected input rows, project the output gradient, one batched product;
* **broadcast use** (``+ − × ÷`` with a batched tensor, or ``expand`` or ``repeat`` to the batch size): the op runs
  on a per-example replica of the value, shape (B, ...), whose gradient is the per-example gradient (position and
  class embeddings, the logit scale, SigLIP's attention-pool probe);
* ``F.multi_head_attention_forward``: recomputed by :func:`~cliptrace.trak.multihead.multi_head_attention` with its
  in- and out-projections as linear uses.

Any other use of a tracked parameter together with batched tensors runs unchanged and marks the parameter, as does
no use at all (a fused kernel may hide it): :meth:`ParameterUses.without_rule` lists them, and the featurizer takes
their blocks from exact per-example gradients instead. A tracked parameter's block is P_r G P_cᵀ for a matrix
(rows and columns projected to ``layer_dim`` when wider, as a layer's sides are), the raw per-example gradient
otherwise. Several uses of one parameter add up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from cliptrace.trak import multihead

LINEAR_FUNCTIONS = {F.linear}
MATMUL_FUNCTIONS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
BROADCAST_FUNCTIONS = {
    torch.add, torch.sub, torch.mul, torch.div, torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul,
    torch.Tensor.div, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__, torch.Tensor.__sub__,
    torch.Tensor.__rsub__, torch.Tensor.__isub__, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
    torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.add_, torch.Tensor.mul_,
}


class RawParameter:
    """A selected parameter outside supported layers, and how its block of features is formed.

    Attributes:
        name: The parameter's qualified name.
        parameter: The parameter.
        row_projection: For a matrix: P_r (k_r × rows), or None for the identity; None otherwise.
        column_projection: For a matrix: P_c (k_c × columns), or None for the identity; None otherwise.
        size: Length of the block.
    """

    def __init__(self, name: str, parameter: nn.Parameter, side_projection: Callable[[int, int], torch.Tensor | None],
                 seed: int) -> None:
        self.name, self.parameter = name, parameter
        self.row_projection = self.column_projection = None
        if parameter.dim() == 2:
            rows, columns = parameter.shape
            self.row_projection = side_projection(rows, seed * 2)
            self.column_projection = side_projection(columns, seed * 2 + 1)
            self.size = (rows if self.row_projection is None else self.row_projection.shape[0]) * (
                columns if self.column_projection is None else self.column_projection.shape[0])
        else:
            self.size = parameter.numel()

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the side projections."""
        for side in ("row_projection", "column_projection"):
            matrix = getattr(self, side)
            if matrix is not None:
                setattr(self, side, matrix.to(device, dtype))

    def block(self, gradients: torch.Tensor) -> torch.Tensor:
        """The (B, size) block from per-example gradients (B, *shape)."""
        if self.parameter.dim() == 2:
            gradients = _project(_project(gradients, self.column_projection), self.row_projection, -2)
        return gradients.reshape(gradients.shape[0], -1)

    def rows_side(self, transposed: bool) -> torch.Tensor | None:
        """The projection of a linear use's input side: columns of P for ``x Pᵀ``, rows for ``x P``."""
        return self.row_projection if transposed else self.column_projection

    def linear_block(self, kept: torch.Tensor, deltas: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The block of a linear use from the kept, projected inputs (B, T, k_in) and output gradients (B, T, d_out):
        Σ_t (P_r δ_t)(P_c x_t)ᵀ for ``y = x Pᵀ``, Σ_t (P_r x_t)(P_c δ_t)ᵀ for ``y = x P``."""
        if transposed:
            return torch.bmm(kept.transpose(1, 2), _project(deltas, self.column_projection)).flatten(1)
        return torch.bmm(_project(deltas, self.row_projection).transpose(1, 2), kept).flatten(1)


def _project(tensor: torch.Tensor, projection: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """``tensor`` with dimension ``dim`` multiplied by ``projection`` (k × d); unchanged for the identity."""
    if projection is None:
        return tensor
    return (tensor.movedim(dim, -1) @ projection.T).movedim(-1, dim)


class _Tracked:
    """A batch-free value derived from a raw parameter: ``replay(P)`` recomputes it (None: it is P itself)."""

    def __init__(self, raw: RawParameter, replay: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.raw, self.replay = raw, replay


class ParameterUses(TorchFunctionMode):
    """Forms the blocks of raw parameters while active over a forward pass of ``batch`` examples.

    Args:
        module: The model (its parameters and buffers are the batch-free constants).
        raw: The tracked parameters.
        batch: The batch size B.
        dtype: The features' dtype.
        add_block: Called with ``(raw, block (B, size))`` when a use's gradient arrives (once per use).
    """

    def __init__(self, module: nn.Module, raw: list[RawParameter], batch: int, dtype: torch.dtype,
                 add_block: Callable[[RawParameter, torch.Tensor], None]) -> None:
        super().__init__()
        self.batch, self.dtype, self.add_block = batch, dtype, add_block
        self.tracked: dict[int, tuple[torch.Tensor, _Tracked]] = {
            id(item.parameter): (item.parameter, _Tracked(item, None)) for item in raw}
        self.constants = {id(t) for t in (*module.parameters(), *module.buffers())} - set(self.tracked)
        self.used: set[str] = set()
        self.unruled: set[str] = set()

    def without_rule(self) -> list[str]:
        """Tracked parameters with a use no rule covers, or with no use the forward pass showed: their blocks are
        incomplete (the caller computes them otherwise)."""
        return [entry.raw.name for _, entry in self.tracked.values() if entry.replay is None
                and (entry.raw.name in self.unruled or entry.raw.name not in self.used)]

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        leaves, spec = tree_flatten((args, kwargs))
        tracked = [self._entry(leaf) for leaf in leaves]
        if not any(tracked):
            return func(*args, **kwargs)
        owners = {entry.raw.name for entry in tracked if entry is not None}
        batched = [isinstance(leaf, torch.Tensor) and entry is None and id(leaf) not in self.constants
                   for leaf, entry in zip(leaves, tracked)]
        if func is F.multi_head_attention_forward:
            call = multihead.bind(args, kwargs)
            if multihead.supports(call):
                return multihead.multi_head_attention(self._linear, call)
        elif not any(batched):
            expand = _as_batch_expand(func, args, self.batch) if len(owners) == 1 and not kwargs else None
            if expand is not None:  # value.repeat(B, 1, …, 1): the same tensor as an expand to the batch
                leaves, spec = tree_flatten((expand, {}))
                return self._broadcast(torch.Tensor.expand, leaves, spec, [self._entry(leaf) for leaf in leaves])
            if len(owners) == 1 and _is_batch_expand(func, args, self.batch):
                return self._broadcast(func, leaves, spec, tracked)
            if len(owners) == 1:
                return self._derive(func, leaves, spec, tracked)
        elif func in LINEAR_FUNCTIONS:  # weight and bias may be two tracked parameters
            x, weight, bias = (*args, kwargs.get("bias"))[:3]
            if weight.dim() == 2 and self._entry(x) is None:
                return self._linear(x, weight, bias)
        elif len(owners) == 1 and func in MATMUL_FUNCTIONS | BROADCAST_FUNCTIONS:
            if func in MATMUL_FUNCTIONS:
                if len(args) == 2 and self._entry(args[0]) is None and args[1].dim() == 2:
                    return self._linear(args[0], args[1], None, transposed=True)
            else:
                return self._broadcast(func, leaves, spec, tracked)
        return self._no_rule(owners, func, args, kwargs)

    def _no_rule(self, owners: set[str], func: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        """Run an op the rules do not cover as it is, and mark its tracked parameters for the exact path."""
        self.unruled.update(owners)
        return func(*args, **kwargs)

    def _entry(self, leaf: Any) -> _Tracked | None:
        if not isinstance(leaf, torch.Tensor):
            return None
        found = self.tracked.get(id(leaf))
        return found[1] if found is not None and found[0] is leaf else None

    def _derive(self, func: Callable[..., Any], leaves: list[Any], spec: Any, tracked: list[_Tracked | None]) -> Any:
        """Run a batch-free op on a tracked value and track its tensor results with how to replay them."""
        result = func(*_unflatten(leaves, spec)[0], **_unflatten(leaves, spec)[1])
        positions = [i for i, entry in enumerate(tracked) if entry is not None]
        raw = tracked[positions[0]].raw

        def replay_at(select: Callable[[Any], Any]) -> Callable[[torch.Tensor], torch.Tensor]:
            def replay(parameter: torch.Tensor) -> torch.Tensor:
                values = list(leaves)
                for i in positions:
                    values[i] = parameter if tracked[i].replay is None else tracked[i].replay(parameter)
                args, kwargs = _unflatten(values, spec)
                return select(func(*args, **kwargs))
            return replay

        outputs = tree_flatten(result)[0]
        for index, output in enumerate(outputs):
            if isinstance(output, torch.Tensor) and id(output) not in self.tracked:
                self.tracked[id(output)] = (output, _Tracked(raw, replay_at(
                    lambda value, index=index: tree_flatten(value)[0][index])))
        return result

    def _broadcast(self, func: Callable[..., Any], leaves: list[Any], spec: Any,
                   tracked: list[_Tracked | None]) -> Any:
        """Run an op that broadcasts a tracked value over the batch on a per-example replica of that value."""
        owners = {entry.raw.name for entry in tracked if entry is not None}
        shapes = [leaf.shape for leaf in leaves if isinstance(leaf, torch.Tensor)]
        sizes = _expand_sizes(leaves[1:]) if func is torch.Tensor.expand else torch.broadcast_shapes(*shapes)
        aligned = {i: (1,) * (len(sizes) - leaves[i].dim()) + tuple(leaves[i].shape)
                   for i, entry in enumerate(tracked) if entry is not None}
        if not sizes or sizes[0] != self.batch or any(not shape or shape[0] != 1 for shape in aligned.values()):
            return self._no_rule(owners, func, *_unflatten(leaves, spec))  # not a broadcast over the batch
        values = list(leaves)
        for i, shape in aligned.items():
            entry, value = tracked[i], leaves[i]
            replica = value.detach().reshape(shape).expand(self.batch, *shape[1:]).clone().requires_grad_()
            replica.register_hook(self._carry_back(entry, tuple(value.shape)))
            values[i] = replica
            self.used.add(entry.raw.name)
        return func(*_unflatten(values, spec)[0], **_unflatten(values, spec)[1])

    def _carry_back(self, entry: _Tracked, shape: tuple[int, ...]) -> Callable[[torch.Tensor], None]:
        """The gradient hook of a replica: per-example gradients of the value, carried back to the parameter."""
        def hook(grad: torch.Tensor) -> None:
            with torch.autocast(grad.device.type, enabled=False):
                gradients = grad.to(self.dtype).reshape(self.batch, *shape)
                if entry.replay is not None:
                    base = entry.raw.parameter.detach().to(self.dtype)
                    _, pullback = torch.func.vjp(entry.replay, base)
                    gradients = torch.func.vmap(pullback)(gradients)[0]
                self.add_block(entry.raw, entry.raw.block(gradients))
        return hook

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                transposed: bool = False) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` (``x @ weight`` when ``transposed``) forming the block of a tracked weight;
        a tracked bias is added as a broadcast use."""
        entry, bias_entry = self._entry(weight), self._entry(bias)
        if entry is not None and (entry.replay is not None or x.shape[0] != self.batch):  # a transformed weight, or
            # rows that are not batch-first
            owners = {e.raw.name for e in (entry, bias_entry) if e is not None}
            return self._no_rule(owners, torch.matmul if transposed else F.linear,
                                 (x, weight) if transposed else (x, weight, bias), {})
        output = x @ weight if transposed else F.linear(x, weight, None if bias_entry is not None else bias)
        if entry is not None:
            self.used.add(entry.raw.name)
            raw = entry.raw
            with torch.autocast(x.device.type, enabled=False):
                rows = x.detach().to(self.dtype).reshape(self.batch, -1, x.shape[-1])
                kept = _project(rows, raw.rows_side(transposed))
            if not output.requires_grad:
                output = output.detach().requires_grad_()

            def hook(grad: torch.Tensor) -> None:
                with torch.autocast(grad.device.type, enabled=False):
                    deltas = grad.to(self.dtype).reshape(self.batch, -1, grad.shape[-1])
                    self.add_block(raw, raw.linear_block(kept, deltas, transposed))

            output.register_hook(hook)
        if bias_entry is not None:
            leaves, spec = tree_flatten(((output, bias), {}))
            output = self._broadcast(torch.add, leaves, spec, [None, bias_entry])
        return output


def _unflatten(leaves: list[Any], spec: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = tree_unflatten(leaves, spec)
    return tuple(args), kwargs


def _expand_sizes(sizes: list[Any]) -> tuple[int, ...]:
    """The sizes of an ``expand`` call, given as separate ints or one sequence."""
    return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)) else tuple(sizes)


def _is_batch_expand(func: Callable[..., Any], args: tuple[Any, ...], batch: int) -> bool:
    """Whether ``func(*args)`` expands a tensor to a new leading dimension of the batch size (a class token)."""
    if func is not torch.Tensor.expand:
        return False
    sizes = _expand_sizes(list(args[1:]))
    value = args[0]
    aligned = (1,) * (len(sizes) - value.dim()) + tuple(value.shape)
    return len(sizes) > 0 and sizes[0] == batch and aligned[0] == 1


def _as_batch_expand(func: Callable[..., Any], args: tuple[Any, ...], batch: int
                     ) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """``(value, sizes)`` when ``func(*args)`` is ``value.repeat(batch, 1, …, 1)`` of a value whose leading size
    (after aligning it to the repeats) is 1, as SigLIP's attention-pool probe: the same tensor as
    ``value.expand(sizes)``. None for any other call."""
    if func is not torch.Tensor.repeat or len(args) < 2:
        return None
    value, repeats = args[0], _expand_sizes(list(args[1:]))
    if len(repeats) < value.dim():
        return None
    aligned = (1,) * (len(repeats) - value.dim()) + tuple(value.shape)
    if repeats[0] != batch or aligned[0] != 1 or any(count != 1 for count in repeats[1:]):
        return None
    return value, (batch, *aligned[1:])
