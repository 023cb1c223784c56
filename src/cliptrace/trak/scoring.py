r"""TRAK scores from stored features: the kernel regression, the checkpoint ensemble, top-k and self-influence.

For checkpoint m with training features X_m (n × k), loss weights Q_m (n) and target features Φ_m (t × k)::

    W_m    = X_m (X_mᵀ X_m + λI)⁻¹                      (n × k)
    τ      = diag(Q̄) · (1/M) Σ_m W_m Φ_mᵀ               (n × t),   Q̄ = (1/M) Σ_m Q_m

i.e. the plain mean of the per-checkpoint kernel scores, re-weighted by the mean loss weight, as in the TRAK
paper. No checkpoint is rescaled: with λ = 0 each term is invariant to the scale of its features, so every
checkpoint counts equally (``traker`` divides each inverse by its mean |entry|, which weights checkpoints by
the size of their gradients).

**The solved kernel** (:class:`Kernel`, one small matrix per checkpoint; W_m itself is never stored when k ≤ n):

* k ≤ n: the lower Cholesky factor L (k × k) of X_mᵀX_m + λI. The Gram matrix is accumulated over row blocks read
  from the features memory map: each block's product X_bᵀX_b is computed in the solve dtype (float32 runs at
  full GEMM speed) and added to a float64 running sum, so rounding does not build up over the n/block_rows
  blocks; λ is added in float64, and the system is cast back to the solve dtype for the Cholesky factorization.
  Scores of row block b are then X_b Ψ_m with Ψ_m = (X_mᵀX_m + λI)⁻¹Φ_mᵀ (k × t, two triangular solves per
  target block), and self-influence is x_iᵀ(X_mᵀX_m + λI)⁻¹x_i = ‖L⁻¹x_i‖².
* k > n: X_mᵀX_m is singular for λ = 0, so W_m = (X_m X_mᵀ + λI)⁻¹ X_m (the same matrix by the push-through
  identity; for λ = 0 the minimum-norm least-squares solution X_m (X_m)⁺ᵀ) is solved with the n × n Gram matrix
  and kept (n < k, so it is no larger than a k × k factor). Scores of row block b are W_b Φ_mᵀ and self-influence
  is ⟨w_i, x_i⟩.

The two cases are told apart by shape alone: a factor is square, W has fewer rows than columns.

**Streaming.** :class:`EnsembleScorer` reads the training features in row blocks (``block_rows``) and never holds
more than one block per checkpoint, plus one ``block_rows × block_size`` tile of scores. Top-k proponents and
opponents are merged across row blocks (a running top-k per target), so no n × t matrix is formed for them; the
full score matrix can be written straight into a caller's array or memory map. Targets are processed
``block_size`` at a time, and each target block reads the training features once.

Self-influence of training example i is τ(z_i, z_i) = Q̄_i (1/M) Σ_m x_{m,i}ᵀ (X_mᵀX_m + λI)⁻¹ x_{m,i}.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cliptrace.trak.store import release_pages

if TYPE_CHECKING:
    from cliptrace.trak.store import FeatureStore

Rows = np.ndarray | torch.Tensor
"""A row-major matrix: an in-memory tensor or array, or a ``.npy`` memory map (read a block at a time)."""

BLOCK_ROWS = 65536
PIECE_BYTES = 64 * 2**20
"""Granularity below a row block: copies out of a memory map, and the temporaries of self-influence."""


def _piece_rows(array: Rows) -> int:
    itemsize = array.itemsize if isinstance(array, np.ndarray) else array.element_size()
    return max(1, PIECE_BYTES // (itemsize * math.prod(array.shape[1:])))


def read_rows(array: Rows, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``array`` as a tensor in RAM.

    A memory map is copied :data:`PIECE_BYTES` at a time, and the mapped pages are dropped from this process's
    resident set after each piece (see :func:`~cliptrace.trak.store.release_pages`), so reading a block costs the
    block plus one piece.
    """
    if isinstance(array, torch.Tensor):
        return array[start:stop]
    block = np.empty((stop - start, *array.shape[1:]), dtype=array.dtype)
    step = _piece_rows(array)
    for offset in range(0, stop - start, step):
        block[offset : offset + step] = array[start + offset : min(start + offset + step, stop)]
        release_pages(array)
    return torch.from_numpy(block)


def _row_ranges(count: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, size):
        yield start, min(start + size, count)


def gram_matrix(
    features: Rows, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", block_rows: int = BLOCK_ROWS
) -> torch.Tensor:
    """XᵀX (k × k, float64, on ``device``), summed over row blocks of X whose products are computed in ``dtype``."""
    total = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=device)
    for start, stop in _row_ranges(features.shape[0], block_rows):
        block = read_rows(features, start, stop).to(device, dtype)
        total += block.T @ block
        del block  # before the next block is read
    return total


def _cholesky(system: torch.Tensor, name: str, lambda_reg: float) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        size = system.shape[0]
        raise ValueError(
            f"the {size}×{size} kernel {name} + λI (λ={lambda_reg:g}) is not positive definite in {system.dtype}: "
            f"features are linearly dependent (duplicated or zero rows/columns); pass lambda_reg > 0 or score in "
            f"float64"
        )
    return factor


@dataclass(frozen=True)
class Kernel:
    """The solved kernel regression of one checkpoint (see the module docstring).

    Attributes:
        matrix: (k, k) lower Cholesky factor L of XᵀX + λI when k ≤ n; (n, k) W = (XXᵀ + λI)⁻¹X when k > n.
    """

    matrix: torch.Tensor

    @property
    def is_factor(self) -> bool:
        """True for a Cholesky factor (k ≤ n), False for W (k > n)."""
        return self.matrix.shape[0] == self.matrix.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the solve, and of every score computed from it."""
        return self.matrix.dtype

    def target_map(self, targets: torch.Tensor) -> torch.Tensor:
        """Ψ (k × t) with scores ``left_rows(...) @ Ψ``: (XᵀX + λI)⁻¹Φᵀ for a factor, Φᵀ for W."""
        right_hand_side = targets.to(self.dtype).T
        return torch.cholesky_solve(right_hand_side, self.matrix) if self.is_factor else right_hand_side

    def left_rows(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the left factor of the scores: X (read from ``features``), or W."""
        return read_rows(features, start, stop).to(self.dtype) if self.is_factor else self.matrix[start:stop]

    def leverage(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """x_iᵀ(XᵀX + λI)⁻¹x_i for the training rows ``[start, stop)``."""
        x = read_rows(features, start, stop).to(self.dtype)
        if not self.is_factor:
            return (self.matrix[start:stop] * x).sum(1)
        return torch.cat([  # ‖L⁻¹x_i‖², a piece of rows at a time: the triangular solve allocates its result
            torch.linalg.solve_triangular(self.matrix.T, piece, upper=True, left=False).square_().sum(1)
            for piece in x.split(_piece_rows(x))])


def solve_kernel(
    features: Rows,
    lambda_reg: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    block_rows: int = BLOCK_ROWS,
) -> Kernel:
    """The :class:`Kernel` of training features X (n × k), by Cholesky in ``dtype`` on ``device``, returned on CPU.

    Args:
        features: X; a memory map is read ``block_rows`` rows at a time when k ≤ n.
        lambda_reg: Ridge term λ.
        dtype: dtype of the solve.
        device: Where the products and the factorization run.
        block_rows: Rows of X per Gram block.

    Raises:
        ValueError: The system is not positive definite (e.g. duplicated or all-zero features with λ = 0).
    """
    n, k = features.shape
    if k <= n:
        system = gram_matrix(features, dtype, device, block_rows)
        system.diagonal().add_(lambda_reg)
        return Kernel(_cholesky(system.to(dtype), "XᵀX", lambda_reg).cpu())
    x = read_rows(features, 0, n).to(device, dtype)
    system = x @ x.T
    system.diagonal().add_(lambda_reg)
    return Kernel(torch.cholesky_solve(x, _cholesky(system, "XXᵀ", lambda_reg)).cpu())


def identity_kernel(features: Rows, dtype: torch.dtype = torch.float32) -> Kernel:
    """A :class:`Kernel` without the regression: scores become plain feature dot products ``XΦᵀ`` (TracIn-style).

    The identity factor when k ≤ n; when k > n, W = X itself.
    """
    n, k = features.shape
    return Kernel(torch.eye(k, dtype=dtype) if k <= n else read_rows(features, 0, n).to(dtype))


def solve_checkpoint(
    store: FeatureStore,
    checkpoint: str,
    lambda_reg: float,
    dtype: torch.dtype,
    device: str | torch.device,
    block_rows: int = BLOCK_ROWS,
) -> None:
    """Solve the :class:`Kernel` (:func:`solve_kernel`) of a fully featurized checkpoint of ``store`` and store it."""
    features, _ = store.features(checkpoint)
    store.save_kernel(checkpoint, solve_kernel(features, lambda_reg, dtype, device, block_rows).matrix.numpy())


def stored_kernel(store: FeatureStore, checkpoint: str) -> Kernel:
    """The :class:`Kernel` that :func:`solve_checkpoint` stored for ``checkpoint``.

    Raises:
        ValueError: The checkpoint has not been solved.
    """
    matrix = store.kernel(checkpoint)
    if matrix is None:
        raise ValueError(f"checkpoint {checkpoint!r} in {store.directory} has no solved kernel")
    return Kernel(torch.from_numpy(np.array(matrix)))


@dataclass
class TopK:
    """The k strongest training examples per target.

    Attributes:
        proponents: (t, k) training indices with the largest scores, strongest first.
        proponent_scores: (t, k) their scores.
        opponents: (t, k) training indices with the most negative scores, strongest first.
        opponent_scores: (t, k) their scores.
    """

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor


def _merge_top(values: torch.Tensor, indices: torch.Tensor, new_values: torch.Tensor, new_indices: torch.Tensor,
               k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k (t × ≤k) merged with a block's candidates (t × c): best first."""
    values, indices = torch.cat([values, new_values], 1), torch.cat([indices, new_indices], 1)
    best = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
    return best.values, indices.gather(1, best.indices)


class EnsembleScorer:
    """Scores targets against training examples over an ensemble of checkpoints, streaming over training rows.

    Args:
        kernels: Per checkpoint, the :class:`Kernel` from :func:`solve_kernel`.
        train_features: Per checkpoint, X_m (n × k): memory maps are read ``block_rows`` rows at a time.
        loss_weights: Per checkpoint, Q_m (n).
        block_size: Targets scored at once (each target block reads the training features once).
        block_rows: Training rows read at once (memory: about ``block_rows × (k + block_size)`` values).
    """

    def __init__(
        self,
        kernels: Sequence[Kernel],
        train_features: Sequence[Rows],
        loss_weights: Sequence[Rows],
        block_size: int = 1024,
        block_rows: int = BLOCK_ROWS,
    ) -> None:
        if not kernels or not len(kernels) == len(train_features) == len(loss_weights):
            raise ValueError(f"need training features and loss weights for each of the {len(kernels)} checkpoints; "
                             f"got {len(train_features)} and {len(loss_weights)}")
        shapes = {tuple(x.shape) for x in train_features}
        if len(shapes) != 1:
            raise ValueError(f"training features disagree in shape across checkpoints: {sorted(shapes)}")
        self.train_size, self.proj_dim = shapes.pop()
        for kernel in kernels:
            expected = (self.proj_dim, self.proj_dim) if self.proj_dim <= self.train_size else (
                self.train_size, self.proj_dim)
            if tuple(kernel.matrix.shape) != expected:
                raise ValueError(f"a kernel of shape {tuple(kernel.matrix.shape)} does not fit training features "
                                 f"({self.train_size}, {self.proj_dim}); expected {expected}")
        self.kernels, self.train_features = list(kernels), list(train_features)
        self.dtype = self.kernels[0].dtype
        self.mean_loss_weight = torch.stack(
            [read_rows(q, 0, self.train_size).to(self.dtype) for q in loss_weights]).mean(0)
        self.block_size, self.block_rows = block_size, block_rows

    def _check(self, targets: Sequence[Rows]) -> int:
        if len(targets) != len(self.kernels):
            raise ValueError(f"got target features for {len(targets)} checkpoints, the ensemble has {len(self.kernels)}")
        sizes = {phi.shape[0] for phi in targets}
        if len(sizes) != 1:
            raise ValueError(f"target features disagree on the number of targets across checkpoints: {sorted(sizes)}")
        return sizes.pop()

    def _tiles(self, targets: Sequence[Rows], start: int, stop: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(row start, row stop, scores)`` of targets ``[start, stop)`` for each block of training rows.

        The scores live in one buffer that the next block overwrites: use them before asking for the next.
        """
        maps = [kernel.target_map(read_rows(phi, start, stop)) / len(self.kernels)
                for kernel, phi in zip(self.kernels, targets, strict=True)]
        buffer = torch.empty(min(self.block_rows, self.train_size), stop - start, dtype=self.dtype)
        for row_start, row_stop in _row_ranges(self.train_size, self.block_rows):
            tile = buffer[: row_stop - row_start].zero_()
            for kernel, features, psi in zip(self.kernels, self.train_features, maps, strict=True):
                tile.addmm_(kernel.left_rows(features, row_start, row_stop), psi)
            yield row_start, row_stop, tile.mul_(self.mean_loss_weight[row_start:row_stop, None])

    def score(self, targets: Sequence[Rows], out: np.ndarray | None = None) -> torch.Tensor:
        """The n × t score matrix for target features Φ_m (t × k), one per checkpoint.

        Args:
            targets: Target features per checkpoint.
            out: An n × t array (e.g. a writable ``.npy`` memory map) to write the scores into, a row block at a
                time; the returned tensor then shares its memory.
        """
        count = self._check(targets)
        if out is not None and out.shape != (self.train_size, count):
            raise ValueError(f"out has shape {out.shape}, expected {(self.train_size, count)}")
        result = torch.empty(self.train_size, count, dtype=self.dtype) if out is None else torch.from_numpy(out)
        for start, stop in _row_ranges(count, self.block_size):
            for row_start, row_stop, tile in self._tiles(targets, start, stop):
                result[row_start:row_stop, start:stop] = tile
                if out is not None:
                    release_pages(out)
        return result

    def top_k(self, targets: Sequence[Rows], k: int, exclude: torch.Tensor | None = None) -> TopK:
        """Top-k proponents and opponents per target, merged over row blocks (no n × t matrix).

        Args:
            targets: Target features per checkpoint.
            k: How many of each (capped at n, or n − 1 where a target is excluded).
            exclude: (t,) a training index to leave out per target (the target itself), or −1.
        """
        count = self._check(targets)
        k = min(k, self.train_size - (1 if exclude is not None else 0))
        parts: list[tuple[torch.Tensor, ...]] = []
        for start, stop in _row_ranges(count, self.block_size):
            width = stop - start
            high = low = torch.empty(width, 0, dtype=self.dtype)
            high_index = low_index = torch.empty(width, 0, dtype=torch.long)
            left_out = None if exclude is None else exclude[start:stop].to(torch.long)
            transposed = torch.empty(width, min(self.block_rows, self.train_size), dtype=self.dtype)
            for row_start, row_stop, tile in self._tiles(targets, start, stop):
                scores = transposed[:, : row_stop - row_start].copy_(tile.T)  # (targets, rows): top-k along rows
                inside = None
                if left_out is not None:
                    inside = torch.nonzero((left_out >= row_start) & (left_out < row_stop)).flatten()
                    scores[inside, left_out[inside] - row_start] = float("-inf")
                top = scores.topk(min(k, row_stop - row_start), dim=1)
                high, high_index = _merge_top(high, high_index, top.values, top.indices + row_start, k, largest=True)
                if inside is not None:
                    scores[inside, left_out[inside] - row_start] = float("inf")
                bottom = scores.topk(min(k, row_stop - row_start), dim=1, largest=False)
                low, low_index = _merge_top(low, low_index, bottom.values, bottom.indices + row_start, k,
                                            largest=False)
            parts.append((high_index, high, low_index, low))
        if not parts:
            empty_index, empty_value = torch.empty(0, k, dtype=torch.long), torch.empty(0, k, dtype=self.dtype)
            return TopK(empty_index, empty_value, empty_index, empty_value)
        return TopK(*(torch.cat(column) for column in zip(*parts)))

    def self_influence(self) -> torch.Tensor:
        """τ(z_i, z_i) for every training example (n), one row block at a time."""
        total = torch.zeros(self.train_size, dtype=self.dtype)
        for start, stop in _row_ranges(self.train_size, self.block_rows):
            for kernel, features in zip(self.kernels, self.train_features, strict=True):
                total[start:stop] += kernel.leverage(features, start, stop)
        return total / len(self.kernels) * self.mean_loss_weight
