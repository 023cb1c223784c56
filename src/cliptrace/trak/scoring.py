r"""TRAK scores from stored features: the kernel regression, the checkpoint ensemble, top-k and self-influence.

For checkpoint m with training features X_m (n × k), loss weights Q_m (n) and target features Φ_m (t × k)::

    W_m    = X_m (X_mᵀ X_m + λI)⁻¹                      (n × k)
    τ      = diag(Q̄) · (1/M) Σ_m W_m Φ_mᵀ               (n × t),   Q̄ = (1/M) Σ_m Q_m

i.e. the plain mean of the per-checkpoint kernel scores, re-weighted by the mean loss weight, as in the TRAK
paper. No checkpoint is rescaled: with λ = 0, or the relative ridge term λ = damping × mean diag(X_mᵀX_m) (see
:func:`ridge_term`), each term is invariant to the scale of its features, so every checkpoint counts equally
(``traker`` divides each inverse by its mean |entry|, which weights checkpoints by the size of their gradients).

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

**Block-diagonal kernels** (:class:`BlockKernel`): with the columns split into blocks X_l (one per layer of the
factored features), XᵀX is replaced by its block diagonal, each block with its own λ_l, so the scores are
Σ_l X_l (X_lᵀX_l + λ_l I)⁻¹ Φ_lᵀ. Each block is a :class:`Kernel` of its own form (factor or W). Both kinds
implement :class:`ScoringKernel`, all that the scorer uses.

**Streaming.** :class:`EnsembleScorer` reads the training features in row blocks (``block_rows``) and never holds
more than one block per checkpoint, plus one ``block_rows × block_size`` tile of scores. Top-k proponents and
opponents are merged across row blocks (a running top-k per target), so no n × t matrix is formed for them; the
full score matrix can be written straight into a caller's array or memory map. Targets are processed
``block_size`` at a time, and each target block reads the training features once.

Self-influence of training example i is τ(z_i, z_i) = Q̄_i (1/M) Σ_m x_{m,i}ᵀ (X_mᵀX_m + λI)⁻¹ x_{m,i}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from cliptrace.files import atomic_directory, write_json
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


def ridge_term(trace: float, dim: int, damping: float = 0.0, lambda_reg: float | None = None) -> float:
    """The ridge term λ added to XᵀX (k × k): ``lambda_reg`` when given, else ``damping × tr(XᵀX) / k``.

    The relative form scales with the features (mean diag(XᵀX) = tr(XᵀX)/k = ‖X‖²_F/k), so scores stay the same
    when every feature is multiplied by s > 0; tr(XXᵀ) = tr(XᵀX), so the k > n form gets the same λ.

    Args:
        trace: tr(XᵀX).
        dim: k, the number of feature columns (λ is 0 for k = 0).
        damping: The relative ridge term.
        lambda_reg: An absolute ridge term; it takes precedence over ``damping``.

    Raises:
        ValueError: ``damping`` or ``lambda_reg`` is negative or not finite.
    """
    for name, value in (("lambda_reg", lambda_reg), ("damping", damping)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    if lambda_reg is not None:
        return float(lambda_reg)
    return float(damping * trace / dim) if dim else 0.0


def _cholesky(system: torch.Tensor, name: str, lambda_reg: float) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        size = system.shape[0]
        raise ValueError(
            f"the {size}×{size} kernel {name} + λI (λ={lambda_reg:g}) is not positive definite in {system.dtype}: "
            f"features are linearly dependent (duplicated or zero rows/columns); pass lambda_reg > 0 or damping > 0, "
            f"or score in float64"
        )
    return factor


class ScoringKernel(Protocol):
    """What :class:`EnsembleScorer` needs of a solved kernel: scores of a row block are
    ``left_rows(X, start, stop) @ target_map(Φ)``."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of every score computed from the kernel."""

    def check(self, train_size: int, dim: int) -> None:
        """Raise ValueError unless the kernel fits training features of shape ``(train_size, dim)``."""

    def target_map(self, targets: torch.Tensor) -> torch.Tensor:
        """Ψ (k × t) for target features Φ (t × k)."""

    def left_rows(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (× k) of the left factor of the scores, given the training features."""

    def leverage(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """Self-influence before loss weights, x_iᵀ(XᵀX + λI)⁻¹x_i, of training rows ``[start, stop)``."""


def _kernel_shape(train_size: int, dim: int) -> tuple[int, int]:
    """The shape of a :class:`Kernel` matrix for (n, k) features: a factor when k ≤ n, else W."""
    return (dim, dim) if dim <= train_size else (train_size, dim)


KERNEL_FILE = "kernel.json"


def _read_description(directory: Path, kind: str) -> dict[str, Any]:
    path = directory / KERNEL_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds no saved kernel ({KERNEL_FILE} is missing)")
    description = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(description, dict) or description.get("kind") != kind:
        found = description.get("kind") if isinstance(description, dict) else None
        raise ValueError(f"{path} describes a {found!r} kernel, not a {kind!r} one")
    return description


def _load_matrix(path: Path) -> torch.Tensor:
    matrix = np.load(path)
    if matrix.ndim != 2 or matrix.dtype not in (np.float32, np.float64) or not np.isfinite(matrix).all():
        raise ValueError(f"{path} is no finite float32/float64 kernel matrix (shape {matrix.shape}, {matrix.dtype})")
    return torch.from_numpy(matrix)


@dataclass(frozen=True)
class Kernel:
    """The solved kernel regression of one checkpoint (see the module docstring).

    Attributes:
        matrix: (k, k) lower Cholesky factor L of XᵀX + λI when k ≤ n; (n, k) W = (XXᵀ + λI)⁻¹X when k > n.
        lambda_reg: The ridge term λ the kernel was solved with; None where it is not known (a kernel read from a
            :class:`~cliptrace.trak.store.FeatureStore`, which keeps the matrix alone) or there is no regression
            (:func:`identity_kernel`).
    """

    matrix: torch.Tensor
    lambda_reg: float | None = None

    @property
    def is_factor(self) -> bool:
        """True for a Cholesky factor (k ≤ n), False for W (k > n)."""
        return self.matrix.shape[0] == self.matrix.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the solve, and of every score computed from it."""
        return self.matrix.dtype

    def check(self, train_size: int, dim: int) -> None:
        """Raise ValueError unless the kernel fits training features of shape ``(train_size, dim)``."""
        expected = _kernel_shape(train_size, dim)
        if tuple(self.matrix.shape) != expected:
            raise ValueError(f"a kernel of shape {tuple(self.matrix.shape)} does not fit training features "
                             f"({train_size}, {dim}); expected {expected}")

    def target_map(self, targets: torch.Tensor) -> torch.Tensor:
        """Ψ (k × t) with scores ``left_rows(...) @ Ψ``: (XᵀX + λI)⁻¹Φᵀ for a factor, Φᵀ for W."""
        right_hand_side = targets.to(self.dtype).T
        return torch.cholesky_solve(right_hand_side, self.matrix) if self.is_factor else right_hand_side

    def left_rows(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the left factor of the scores: X (read from ``features``), or W."""
        return read_rows(features, start, stop).to(self.dtype) if self.is_factor else self.matrix[start:stop]

    def leverage(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """x_iᵀ(XᵀX + λI)⁻¹x_i for the training rows ``[start, stop)``."""
        return self._leverage(read_rows(features, start, stop).to(self.dtype), start, stop)

    def _left(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """:meth:`left_rows` from the rows ``x`` of X already read."""
        return x if self.is_factor else self.matrix[start:stop]

    def _leverage(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """:meth:`leverage` from the rows ``x`` of X already read (in :attr:`dtype`)."""
        if not self.is_factor:
            return (self.matrix[start:stop] * x).sum(1)
        return torch.cat([  # ‖L⁻¹x_i‖², a piece of rows at a time: the triangular solve allocates its result
            torch.linalg.solve_triangular(self.matrix.T, piece, upper=True, left=False).square_().sum(1)
            for piece in x.split(_piece_rows(x))])

    def save(self, directory: str | Path) -> None:
        """Write the kernel to ``directory`` (``matrix.npy`` and ``kernel.json``), which appears only once complete."""
        with atomic_directory(directory) as partial:
            np.save(partial / "matrix.npy", self.matrix.numpy())
            write_json(partial / KERNEL_FILE, {"kind": "kernel", "lambda_reg": self.lambda_reg})

    @classmethod
    def load(cls, directory: str | Path) -> Kernel:
        """The kernel :meth:`save` wrote to ``directory``.

        Raises:
            ValueError: ``directory`` holds no saved :class:`Kernel`, or its matrix is damaged.
        """
        directory = Path(directory)
        description = _read_description(directory, "kernel")
        return cls(_load_matrix(directory / "matrix.npy"), description.get("lambda_reg"))


def solve_kernel(
    features: Rows,
    lambda_reg: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    block_rows: int = BLOCK_ROWS,
    *,
    damping: float = 0.0,
) -> Kernel:
    """The :class:`Kernel` of training features X (n × k), by Cholesky in ``dtype`` on ``device``, returned on CPU.

    Args:
        features: X; a memory map is read ``block_rows`` rows at a time when k ≤ n.
        lambda_reg: Absolute ridge term λ; None for the relative ``damping``.
        dtype: dtype of the solve.
        device: Where the products and the factorization run.
        block_rows: Rows of X per Gram block.
        damping: Relative ridge term: λ = damping × mean diag(XᵀX) (see :func:`ridge_term`) unless ``lambda_reg``
            is given.

    Returns:
        The kernel, with the λ it was solved with.

    Raises:
        ValueError: The system is not positive definite (e.g. duplicated or all-zero features with λ = 0), or a
            ridge term is negative.
    """
    ridge_term(0.0, 0, damping, lambda_reg)  # refuse a bad ridge term before any work
    n, k = features.shape
    if k <= n:
        system = gram_matrix(features, dtype, device, block_rows)
        lam = ridge_term(system.diagonal().sum().item(), k, damping, lambda_reg)
        system.diagonal().add_(lam)
        return Kernel(_cholesky(system.to(dtype), "XᵀX", lam).cpu(), lam)
    x = read_rows(features, 0, n).to(device, dtype)
    system = x @ x.T
    lam = ridge_term(system.diagonal().double().sum().item(), k, damping, lambda_reg)
    system.diagonal().add_(lam)
    return Kernel(torch.cholesky_solve(x, _cholesky(system, "XXᵀ", lam)).cpu(), lam)


def identity_kernel(features: Rows, dtype: torch.dtype = torch.float32) -> Kernel:
    """A :class:`Kernel` without the regression: scores become plain feature dot products ``XΦᵀ`` (TracIn-style).

    The identity factor when k ≤ n; when k > n, W = X itself.
    """
    n, k = features.shape
    return Kernel(torch.eye(k, dtype=dtype) if k <= n else read_rows(features, 0, n).to(dtype))


def check_blocks(blocks: Sequence[slice], dim: int) -> tuple[slice, ...]:
    """The non-empty column blocks of ``dim`` features, in column order, once checked to cover [0, dim) exactly.

    Empty slices (such as an unused ``"other"`` entry of
    :meth:`~cliptrace.trak.factored.FactoredFeaturizer.layer_slices`) are dropped.

    Raises:
        ValueError: A slice is not a plain ``slice(start, stop)`` of integers, lies outside [0, dim), overlaps
            another, or columns lie in no block; the message names the slice.
    """
    kept = []
    for block in blocks:
        if not (isinstance(block, slice) and isinstance(block.start, int) and isinstance(block.stop, int)
                and block.step in (None, 1)):
            raise ValueError(f"block {block!r} is not a slice(start, stop) of integers with step 1")
        if not 0 <= block.start <= block.stop <= dim:
            raise ValueError(f"block {block!r} lies outside the {dim} feature columns [0, {dim})")
        if block.stop > block.start:
            kept.append(slice(block.start, block.stop))
    kept.sort(key=lambda block: block.start)
    end, previous = 0, None
    for block in kept:
        if block.start < end:
            raise ValueError(f"block {block!r} overlaps block {previous!r}")
        if block.start > end:
            after = f"after block {previous!r}" if previous is not None else "before it"
            raise ValueError(f"columns [{end}, {block.start}) lie in no block: a gap {after}, before block {block!r}")
        end, previous = block.stop, block
    if end < dim:
        after = f"after block {previous!r}" if previous is not None else "(no block given)"
        raise ValueError(f"columns [{end}, {dim}) lie in no block: a gap {after}")
    return tuple(kept)


@dataclass(frozen=True)
class BlockKernel:
    """One :class:`Kernel` per column block of the features (a block-diagonal Gauss–Newton matrix).

    With X_l the columns of block l and λ_l its ridge term, the scores are Σ_l X_l (X_lᵀX_l + λ_l I)⁻¹ Φ_lᵀ and the
    self-influence of row i is Σ_l x_{l,i}ᵀ(X_lᵀX_l + λ_l I)⁻¹x_{l,i}. Each block keeps its own form: a k_l × k_l
    Cholesky factor when k_l ≤ n, else the n × k_l matrix W_l, so memory is Σ_l min(k_l², n·k_l) values (32 blocks of
    1024 with n = 50,000: 32 Mi values, 128 MiB in float32, against 4 GiB for one 32768 × 32768 factor).

    Attributes:
        blocks: The column blocks, in column order, covering [0, k).
        kernels: The kernel of each block.
    """

    blocks: tuple[slice, ...]
    kernels: tuple[Kernel, ...]

    def __post_init__(self) -> None:
        blocks = check_blocks(self.blocks, self.blocks[-1].stop if self.blocks else 0)
        if blocks != tuple(self.blocks):
            raise ValueError(f"blocks must be non-empty and in column order, got {list(self.blocks)}")
        if not blocks or len(blocks) != len(self.kernels):
            raise ValueError(f"need one kernel for each of the {len(blocks)} blocks, got {len(self.kernels)}")
        for block, kernel in zip(blocks, self.kernels, strict=True):
            if kernel.matrix.shape[1] != block.stop - block.start:
                raise ValueError(f"the kernel of block {block!r} has {kernel.matrix.shape[1]} columns, expected "
                                 f"{block.stop - block.start}")
        if len({kernel.dtype for kernel in self.kernels}) != 1:
            raise ValueError(f"the block kernels disagree in dtype: {sorted({str(k.dtype) for k in self.kernels})}")

    @property
    def dim(self) -> int:
        """k, the number of feature columns covered."""
        return self.blocks[-1].stop

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the solve, and of every score computed from it."""
        return self.kernels[0].dtype

    @property
    def lambda_regs(self) -> tuple[float | None, ...]:
        """The ridge term λ_l of each block."""
        return tuple(kernel.lambda_reg for kernel in self.kernels)

    def check(self, train_size: int, dim: int) -> None:
        """Raise ValueError unless the kernel fits training features of shape ``(train_size, dim)``."""
        if dim != self.dim:
            raise ValueError(f"a block kernel over {self.dim} feature columns does not fit training features "
                             f"({train_size}, {dim})")
        for block, kernel in zip(self.blocks, self.kernels, strict=True):
            expected = _kernel_shape(train_size, block.stop - block.start)
            if tuple(kernel.matrix.shape) != expected:
                raise ValueError(f"the kernel of block {block!r}, of shape {tuple(kernel.matrix.shape)}, does not fit "
                                 f"training features ({train_size}, {dim}); expected {expected}")

    def target_map(self, targets: torch.Tensor) -> torch.Tensor:
        """Ψ (k × t): the blocks' Ψ_l stacked in column order."""
        return torch.cat([kernel.target_map(targets[:, block])
                          for block, kernel in zip(self.blocks, self.kernels, strict=True)])

    def left_rows(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the blocks' left factors side by side: X_l, or W_l where k_l > n."""
        x = read_rows(features, start, stop).to(self.dtype)
        if all(kernel.is_factor for kernel in self.kernels):
            return x
        return torch.cat([kernel._left(x[:, block], start, stop)
                          for block, kernel in zip(self.blocks, self.kernels, strict=True)], 1)

    def leverage(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """Σ_l x_{l,i}ᵀ(X_lᵀX_l + λ_l I)⁻¹x_{l,i} for the training rows ``[start, stop)``."""
        x = read_rows(features, start, stop).to(self.dtype)
        total = torch.zeros(stop - start, dtype=self.dtype)
        for block, kernel in zip(self.blocks, self.kernels, strict=True):
            total += kernel._leverage(x[:, block], start, stop)
        return total

    def save(self, directory: str | Path) -> None:
        """Write the kernel to ``directory`` (``block-NNNN.npy`` per block and ``kernel.json`` with the blocks and
        their λ_l), which appears only once complete."""
        with atomic_directory(directory) as partial:
            for index, kernel in enumerate(self.kernels):
                np.save(partial / f"block-{index:04d}.npy", kernel.matrix.numpy())
            write_json(partial / KERNEL_FILE, {
                "kind": "block",
                "blocks": [[block.start, block.stop] for block in self.blocks],
                "lambda_reg": list(self.lambda_regs),
            })

    @classmethod
    def load(cls, directory: str | Path) -> BlockKernel:
        """The kernel :meth:`save` wrote to ``directory``.

        Raises:
            ValueError: ``directory`` holds no saved :class:`BlockKernel`, or it is damaged.
        """
        directory = Path(directory)
        description = _read_description(directory, "block")
        bounds, lambdas = description.get("blocks"), description.get("lambda_reg")
        if not isinstance(bounds, list) or not isinstance(lambdas, list) or len(bounds) != len(lambdas):
            raise ValueError(f"{directory / KERNEL_FILE} needs lists 'blocks' and 'lambda_reg' of the same length")
        blocks = tuple(slice(*pair) for pair in bounds)
        kernels = tuple(Kernel(_load_matrix(directory / f"block-{index:04d}.npy"), lam)
                        for index, lam in enumerate(lambdas))
        return cls(blocks, kernels)


def solve_block_kernel(
    features: Rows,
    blocks: Sequence[slice],
    *,
    damping: float = 0.0,
    lambda_reg: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    block_rows: int = BLOCK_ROWS,
) -> BlockKernel:
    """The :class:`BlockKernel` of training features X (n × k): :func:`solve_kernel` on each column block.

    Args:
        features: X; a memory map is read a row block at a time, and only the block's columns of it.
        blocks: Disjoint column slices covering [0, k), e.g. the values of
            :meth:`~cliptrace.trak.factored.FactoredFeaturizer.layer_slices` (empty ones are dropped).
        damping: Relative ridge term of each block: λ_l = damping × mean diag(X_lᵀX_l).
        lambda_reg: An absolute ridge term for every block instead.
        dtype, device, block_rows: As for :func:`solve_kernel`.

    Raises:
        ValueError: Bad blocks (see :func:`check_blocks`), or a block's system is not positive definite.
    """
    ridge_term(0.0, 0, damping, lambda_reg)
    blocks = check_blocks(blocks, features.shape[1])
    return BlockKernel(blocks, tuple(
        solve_kernel(features[:, block], lambda_reg, dtype, device, block_rows, damping=damping) for block in blocks))


def solve_checkpoint(
    store: FeatureStore,
    checkpoint: str,
    lambda_reg: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    block_rows: int = BLOCK_ROWS,
    *,
    damping: float = 0.0,
) -> Kernel:
    """Solve the :class:`Kernel` (:func:`solve_kernel`) of a fully featurized checkpoint of ``store`` and store it.

    Returns:
        The kernel, with the λ it was solved with (the store keeps the matrix alone).
    """
    features, _ = store.features(checkpoint)
    kernel = solve_kernel(features, lambda_reg, dtype, device, block_rows, damping=damping)
    store.save_kernel(checkpoint, kernel.matrix.numpy())
    return kernel


def stored_kernel(store: FeatureStore, checkpoint: str) -> Kernel:
    """The :class:`Kernel` that :func:`solve_checkpoint` stored for ``checkpoint`` (its λ is not stored: None).

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
        kernels: Per checkpoint, a :class:`ScoringKernel`: the :class:`Kernel` from :func:`solve_kernel`, or the
            :class:`BlockKernel` from :func:`solve_block_kernel`.
        train_features: Per checkpoint, X_m (n × k): memory maps are read ``block_rows`` rows at a time.
        loss_weights: Per checkpoint, Q_m (n).
        block_size: Targets scored at once (each target block reads the training features once).
        block_rows: Training rows read at once (memory: about ``block_rows × (k + block_size)`` values).
    """

    def __init__(
        self,
        kernels: Sequence[ScoringKernel],
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
            kernel.check(self.train_size, self.proj_dim)
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
