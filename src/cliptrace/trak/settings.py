"""The one settings object of data attribution: what defines the features, the kernel and the scores.

Every entry point (``attribute``, ``featurize``, the CLI, ``report``, ``verify``) takes an
:class:`AttributionSettings` whole, so each setting has one default, documented here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FEATURE_PATHS = ("auto", "factored", "exact")
OTHER_PARAMETER_POLICIES = ("factored", "exclude", "exact", "error")
WHITENINGS = ("kfac", "ekfac")
SCORE_DTYPES = ("float32", "float64")
AUTO = "auto"
DEFAULT_METHOD = "trak"
"""The data-attribution method used when none is named (see :data:`cliptrace.attribution.METHODS`)."""


@dataclass(frozen=True)
class AttributionSettings:
    """Everything that defines the features, the kernel and the scores of a data-attribution method.

    Attributes:
        proj_dim: Feature dimension k of the projected gradients (None: no final projection).
        projection: ``"rademacher"`` or ``"gaussian"`` random projections.
        seed: Seed of the projections and of the negative-bank draw.
        bank_size: Training pairs in the CLIP margin's negative bank.
        parameters: Parameter names or globs to differentiate (None: every trainable parameter).
        damping: The ridge term relative to the features' scale: λ = damping × mean diag(XᵀX) (per layer block for
            the block-diagonal method), so one value fits any model and feature scale. ``"auto"`` chooses it per
            checkpoint without retraining (see :mod:`cliptrace.trak.damping`); the choice is printed and stored.
        lambda_reg: An absolute ridge term λ; when set, it replaces ``damping``.
        batch_size: Records featurized at once.
        score_dtype: ``"float32"`` or ``"float64"`` for features, kernels and scores (float64 also runs the model in
            float64).
        device: Torch device of featurization and solves.
        features: ``"factored"`` (hooks on linear-type layers, about the cost of a training step), ``"exact"``
            (per-example gradients and a dense projection, the reference) or ``"auto"`` (factored wherever it
            applies).
        layer_dim: Factored path: width each side of a layer is projected to.
        other_parameters: Factored path: ``"factored"`` (op rules, :mod:`cliptrace.trak.raw_parameters`),
            ``"exclude"``, ``"exact"`` or ``"error"`` for selected parameters outside the layers it hooks.
        whitening: Factored path: ``"kfac"`` or ``"ekfac"`` whitens each layer's gradient by its K-FAC / EK-FAC
            Gauss–Newton factors before projecting (:mod:`cliptrace.trak.kfac`), with ridge term ``damping`` × the
            layer's mean eigenvalue; None (default) projects plain gradients.
        fit_records: Whitening: training records its statistics are fitted on (the first of a seeded shuffle);
            None fits on all of them.
    """

    proj_dim: int | None = 2048
    projection: str = "rademacher"
    seed: int = 0
    bank_size: int = 1024
    parameters: tuple[str, ...] | None = None
    damping: float | str = 0.1
    lambda_reg: float | None = None
    batch_size: int = 16
    score_dtype: str = "float32"
    device: str = "cpu"
    features: str = "auto"
    layer_dim: int = 32
    other_parameters: str = "factored"
    whitening: str | None = None
    fit_records: int | None = None

    def __post_init__(self) -> None:
        if self.parameters is not None and not isinstance(self.parameters, tuple):
            object.__setattr__(self, "parameters", tuple(self.parameters) or None)
        problems = []
        if self.proj_dim is not None and self.proj_dim < 1:
            problems.append(f"proj_dim must be positive or None, got {self.proj_dim}")
        if self.damping != AUTO and (isinstance(self.damping, str) or not self.damping >= 0):
            problems.append(f"damping must be a non-negative number or 'auto', got {self.damping!r}")
        if self.lambda_reg is not None and not self.lambda_reg >= 0:
            problems.append(f"lambda_reg must be non-negative or None, got {self.lambda_reg!r}")
        if self.score_dtype not in SCORE_DTYPES:
            problems.append(f"score_dtype must be one of {SCORE_DTYPES}, got {self.score_dtype!r}")
        if self.features not in FEATURE_PATHS:
            problems.append(f"features must be one of {FEATURE_PATHS}, got {self.features!r}")
        if self.other_parameters not in OTHER_PARAMETER_POLICIES:
            problems.append(f"other_parameters must be one of {OTHER_PARAMETER_POLICIES}, got {self.other_parameters!r}")
        if self.whitening is not None:
            if self.whitening not in WHITENINGS:
                problems.append(f"whitening must be one of {WHITENINGS} or None, got {self.whitening!r}")
            if self.features == "exact" or self.damping == AUTO or self.lambda_reg is not None or not self.damping:
                problems.append("whitening needs the factored features and a positive relative damping (not 'auto', "
                                "no lambda_reg)")
        if self.fit_records is not None and self.fit_records < 1:
            problems.append(f"fit_records must be positive or None, got {self.fit_records}")
        for name in ("batch_size", "bank_size", "layer_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        """``score_dtype`` as a torch dtype."""
        import torch

        return torch.float64 if self.score_dtype == "float64" else torch.float32

    def replace(self, **changes: Any) -> AttributionSettings:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def feature_settings(self) -> dict[str, Any]:
        """The settings that change the stored features (not the kernel, the batching or the device)."""
        return {"proj_dim": self.proj_dim, "projection": self.projection, "seed": self.seed,
                "bank_size": self.bank_size, "parameters": list(self.parameters) if self.parameters else None,
                "score_dtype": self.score_dtype, "features": self.features, "layer_dim": self.layer_dim,
                "other_parameters": self.other_parameters} | (
            {"whitening": self.whitening, "whitening_damping": self.damping, "fit_records": self.fit_records}
            if self.whitening is not None else {})

    def store_name(self) -> str:
        """A folder name that differs whenever the stored features would: readable, with a digest of the rest."""
        digest = hashlib.sha256(json.dumps(self.feature_settings(), sort_keys=True).encode()).hexdigest()[:8]
        dim = "layers" if self.proj_dim is None else f"k{self.proj_dim}"
        whitening = "" if self.whitening is None else f"-{self.whitening}{self.damping:g}"
        return f"{self.features}-{dim}{whitening}-seed{self.seed}-{digest}"

    def damping_spec(self) -> dict[str, Any]:
        """How the ridge term is set, as stored beside a solved kernel: an absolute λ or a relative damping."""
        return {"lambda_reg": self.lambda_reg} if self.lambda_reg is not None else {"damping": self.damping}

    def describe_damping(self) -> str:
        """The ridge-term setting in words, e.g. ``damping 0.1 × mean diag(XᵀX)``."""
        if self.lambda_reg is not None:
            return f"λ = {self.lambda_reg:g}"
        if self.damping == AUTO:
            return "damping chosen automatically"
        return f"λ = {self.damping:g} × mean diag(XᵀX)"


def default_store_root(run: str | Path) -> Path:
    """Where a run's feature stores live: ``RUN/trak/features``, one folder per feature setting."""
    return Path(run) / "trak" / "features"
