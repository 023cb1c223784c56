"""Random projections of gradients: dense seeded JL matrices generated in bounded-memory chunks.

A projector maps (B, D) gradients to (B, k) features. The dense projector's matrix P (D × k) has i.i.d. entries
±1/√k (Rademacher) or N(0, 1/k) (Gaussian), so E[⟨Pᵀg, Pᵀh⟩] = ⟨g, h⟩. P is cut into row blocks; block c is drawn
from a CPU generator seeded by ``(seed, c)`` and then moved to the working device, so the same seed gives the
same matrix on every device and for every batch size. Only ``cache_bytes`` worth of blocks are kept between
calls (as float32 when the whole matrix fits, else as int8 signs); the others are regenerated when needed.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np
import torch

PROJECTION_KINDS = ("rademacher", "gaussian")


def working_dtype(gradients: torch.Tensor) -> torch.dtype:
    """float64 for float64 gradients (exact references), float32 for everything else."""
    return torch.float64 if gradients.dtype == torch.float64 else torch.float32


class Projector(abc.ABC):
    """Maps flattened gradients (B, D) to features (B, proj_dim)."""

    input_dim: int
    proj_dim: int

    @abc.abstractmethod
    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """Features of ``gradients`` (B, input_dim) -> (B, proj_dim), in float64 for float64 input, else float32."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """What defines the projection (recorded with stored features)."""


class IdentityProjector(Projector):
    """No projection: features are the raw gradients (for tiny models and exact references)."""

    def __init__(self, input_dim: int) -> None:
        self.input_dim = self.proj_dim = input_dim

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.to(working_dtype(gradients))

    def settings(self) -> dict[str, Any]:
        return {"kind": "identity", "input_dim": self.input_dim, "proj_dim": self.proj_dim}


class DenseProjector(Projector):
    """A dense seeded Rademacher or Gaussian JL projection, generated in row blocks.

    Args:
        input_dim: D, the gradient dimension.
        proj_dim: k, the feature dimension.
        kind: ``"rademacher"`` or ``"gaussian"``.
        seed: Seed of the matrix.
        block_rows: Rows of P per generated block (bounds the memory of one block to block_rows × k floats).
        cache_bytes: Memory allowed for keeping generated blocks between calls.
    """

    def __init__(
        self,
        input_dim: int,
        proj_dim: int,
        kind: str = "rademacher",
        seed: int = 0,
        block_rows: int = 16384,
        cache_bytes: int = 2 << 30,
    ) -> None:
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"unknown projection kind {kind!r}; expected one of {PROJECTION_KINDS}")
        if input_dim < 1 or proj_dim < 1 or block_rows < 1:
            raise ValueError(f"input_dim, proj_dim and block_rows must be positive, got {input_dim}, {proj_dim}, "
                             f"{block_rows}")
        self.input_dim, self.proj_dim, self.kind, self.seed = input_dim, proj_dim, kind, seed
        self.block_rows = block_rows
        # Cached blocks are float32, ready to multiply, when the whole matrix fits; else compact int8 signs.
        fits_as_float = input_dim * proj_dim * 4 <= cache_bytes
        self._cache_dtype = torch.float32 if fits_as_float or kind == "gaussian" else torch.int8
        bytes_per_block = block_rows * proj_dim * (4 if self._cache_dtype == torch.float32 else 1)
        self._cached_blocks = max(0, cache_bytes // bytes_per_block)
        self._cache: dict[int, torch.Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_dim": self.input_dim, "proj_dim": self.proj_dim, "seed": self.seed,
                "block_rows": self.block_rows}

    def block(self, number: int) -> torch.Tensor:
        """Row block ``number`` of P, unscaled: ±1 entries (Rademacher; int8 or float32) or float32 N(0, 1) entries."""
        if number in self._cache:
            return self._cache[number]
        rows = min(self.block_rows, self.input_dim - number * self.block_rows)
        state = np.random.SeedSequence([self.seed, number]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        if self.kind == "rademacher":
            block = torch.randint(0, 2, (rows, self.proj_dim), generator=generator, dtype=torch.int8) * 2 - 1
        else:
            block = torch.randn(rows, self.proj_dim, generator=generator)
        if len(self._cache) < self._cached_blocks:
            block = block.to(self._cache_dtype)
            self._cache[number] = block
        return block

    def matrix(self) -> torch.Tensor:
        """The whole D × k matrix P, scaled (for tests and small problems)."""
        return torch.cat([self.block(c).float() for c in range(self.num_blocks)]) / math.sqrt(self.proj_dim)

    @property
    def num_blocks(self) -> int:
        """Number of row blocks of P."""
        return math.ceil(self.input_dim / self.block_rows)

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        if gradients.shape[-1] != self.input_dim:
            raise ValueError(f"gradients have dimension {gradients.shape[-1]}, the projector expects {self.input_dim}")
        gradients = gradients.to(working_dtype(gradients))
        out = torch.zeros(gradients.shape[0], self.proj_dim, device=gradients.device, dtype=gradients.dtype)
        for number in range(self.num_blocks):
            start = number * self.block_rows
            block = self.block(number).to(gradients.device, gradients.dtype)
            out.addmm_(gradients[:, start : start + block.shape[0]], block)
        return out / math.sqrt(self.proj_dim)


class CountSketchProjector(Projector):
    """A seeded CountSketch: input coordinate i is added, with a random sign s_i, to output coordinate h(i).

    ⟨Sa, Sb⟩ is an unbiased estimate of ⟨a, b⟩, like a dense JL projection, at the cost of one pass over the input
    (no matrix product): the cheap final stage of the factored feature path, whose inputs are already projected.

    Args:
        input_dim: D.
        proj_dim: k.
        seed: Seed of the buckets and signs.
    """

    def __init__(self, input_dim: int, proj_dim: int, seed: int = 0) -> None:
        if input_dim < 1 or proj_dim < 1:
            raise ValueError(f"input_dim and proj_dim must be positive, got {input_dim}, {proj_dim}")
        self.input_dim, self.proj_dim, self.seed = input_dim, proj_dim, seed
        generator = torch.Generator().manual_seed(seed)
        self.buckets = torch.randint(0, proj_dim, (input_dim,), generator=generator)
        self.signs = torch.randint(0, 2, (input_dim,), generator=generator, dtype=torch.int8) * 2 - 1

    def settings(self) -> dict[str, Any]:
        return {"kind": "count_sketch", "input_dim": self.input_dim, "proj_dim": self.proj_dim, "seed": self.seed}

    def matrix(self) -> torch.Tensor:
        """The D × k matrix S (for tests and small problems)."""
        dense = torch.zeros(self.input_dim, self.proj_dim)
        dense[torch.arange(self.input_dim), self.buckets] = self.signs.float()
        return dense

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        if gradients.shape[-1] != self.input_dim:
            raise ValueError(f"input has dimension {gradients.shape[-1]}, the sketch expects {self.input_dim}")
        gradients = gradients.to(working_dtype(gradients))
        signed = gradients * self.signs.to(gradients.device, gradients.dtype)
        out = torch.zeros(gradients.shape[0], self.proj_dim, device=gradients.device, dtype=gradients.dtype)
        return out.index_add_(1, self.buckets.to(gradients.device), signed)
