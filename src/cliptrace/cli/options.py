"""Option groups defined once for every command that takes them.

* The data options of every command that reads a dataset: ``--format``, ``--image-root``, ``--sep``,
  ``--image-key``, ``--caption-key``. A command declares one parameter ``data_options: DataOptions``;
  :func:`with_data_options` replaces it by the five options and hands it the
  :class:`~cliptrace.data.options.DataOptions` they make.
* The attribution settings of every command that attributes (``trak``, ``report``, ``verify``): a parameter
  ``settings: AttributionSettings``, filled by :func:`with_attribution_settings` from ``--proj-dim``,
  ``--damping``, ... whose defaults are those of :class:`~cliptrace.trak.settings.AttributionSettings`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from cliptrace.data.options import DataOptions
from cliptrace.data.readers import FORMATS
from cliptrace.trak.settings import FEATURE_PATHS, OTHER_PARAMETER_POLICIES, WHITENINGS, AttributionSettings

Command = TypeVar("Command", bound=Callable[..., Any])
_DATA_OPTIONS: dict[str, tuple[Any, Any]] = {  # parameter -> (annotation, default)
    "data_format": (Annotated[str, typer.Option(
        "--format", help=f"Dataset format: {', '.join(FORMATS)}, or auto (detected from the path).",
        rich_help_panel="Data")], "auto"),
    "image_root": (Annotated[Optional[Path], typer.Option(
        "--image-root", help="Directory the dataset's relative image paths are read from (default: the folder "
                             "of the dataset file).", rich_help_panel="Data")], None),
    "sep": (Annotated[Optional[str], typer.Option(
        "--sep", help="CSV separator; 'tab' or '\\t' for a tab (default: tab for .tsv, else comma).",
        rich_help_panel="Data")], None),
    "image_key": (Annotated[Optional[str], typer.Option(
        "--image-key", help="Image column or key (default: the format's, e.g. filepath for CSV).",
        rich_help_panel="Data")], None),
    "caption_key": (Annotated[Optional[list[str]], typer.Option(
        "--caption-key", help="Caption column or key; comma-separated (or repeated) for several caption columns.",
        rich_help_panel="Data")], None),
}


def data_options(data_format: str = "auto", image_root: Path | None = None, sep: str | None = None,
                 image_key: str | None = None, caption_key: list[str] | None = None) -> DataOptions:
    """The :class:`DataOptions` of the five command-line options."""
    return DataOptions(format=data_format, image_root=None if image_root is None else str(image_root), sep=sep,
                       image_key=image_key, caption_key=caption_key)


def _with_group(parameter: str, options: dict[str, tuple[Any, Any]], build: Callable[..., Any]
                ) -> Callable[[Command], Command]:
    """A decorator replacing a command's ``parameter`` by ``options`` (added at the end of its options); the
    command receives ``build(**their values)``."""

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        if parameter not in signature.parameters:
            raise TypeError(f"{command.__name__} has no {parameter} parameter")
        kept = [item for name, item in signature.parameters.items() if name != parameter]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for name, (annotation, default) in options.items()]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name, default) for name, (_, default) in options.items()}
            return command(*args, **{parameter: build(**given)}, **kwargs)

        del wrapper.__wrapped__  # typer reads the signature below, not the wrapped function's
        wrapper.__signature__ = signature.replace(parameters=[*kept, *added])
        wrapper.__annotations__ = {item.name: item.annotation for item in [*kept, *added]}
        return wrapper  # type: ignore[return-value]

    return decorate


with_data_options = _with_group("data_options", _DATA_OPTIONS, data_options)
"""``command`` with its ``data_options: DataOptions`` parameter taken from ``--format``, ``--image-root``,
``--sep``, ``--image-key`` and ``--caption-key``."""


_DEFAULT = AttributionSettings()
_PANEL = "Attribution settings"
_ATTRIBUTION_OPTIONS: dict[str, tuple[Any, Any]] = {  # parameter -> (annotation, default)
    "proj_dim": (Annotated[int, typer.Option(
        help="Projection dimension k (0: no projection, raw gradients).", rich_help_panel=_PANEL)], _DEFAULT.proj_dim),
    "projection": (Annotated[str, typer.Option(help="rademacher or gaussian.", rich_help_panel=_PANEL)],
                   _DEFAULT.projection),
    "seed": (Annotated[int, typer.Option(help="Seed of the projections and of the negative-bank draw.",
                                         rich_help_panel=_PANEL)], _DEFAULT.seed),
    "bank_size": (Annotated[int, typer.Option(help="Training pairs in the CLIP margin's negative bank.",
                                              rich_help_panel=_PANEL)], _DEFAULT.bank_size),
    "parameters": (Annotated[Optional[list[str]], typer.Option(
        "--parameter", help="Parameter name or glob to differentiate (repeatable; default: all trainable).",
        rich_help_panel=_PANEL)], None),
    "damping": (Annotated[str, typer.Option(
        help="Ridge term relative to the features' scale, λ = DAMPING × mean diag(XᵀX); or auto (chosen per "
             "checkpoint by generalized cross-validation, printed and stored).", rich_help_panel=_PANEL)],
        str(_DEFAULT.damping)),
    "lambda_reg": (Annotated[Optional[float], typer.Option(
        help="An absolute ridge term λ instead of --damping.", rich_help_panel=_PANEL)], _DEFAULT.lambda_reg),
    "batch_size": (Annotated[int, typer.Option(help="Records featurized at once.", rich_help_panel=_PANEL)],
                   _DEFAULT.batch_size),
    "dtype": (Annotated[str, typer.Option(help="float32 or float64 for features, kernels and scores.",
                                          rich_help_panel=_PANEL)], _DEFAULT.score_dtype),
    "device": (Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.", rich_help_panel=_PANEL)],
               _DEFAULT.device),
    "features": (Annotated[str, typer.Option(
        help=f"Feature path ({', '.join(FEATURE_PATHS)}): factored (hooks on linear-type layers, about the cost of "
             "a training step), exact (per-example gradients + dense projection, the reference), or auto "
             "(factored unless --proj-dim 0).", rich_help_panel=_PANEL)], _DEFAULT.features),
    "layer_dim": (Annotated[int, typer.Option(help="Factored path: width each side of a layer is projected to.",
                                              rich_help_panel=_PANEL)], _DEFAULT.layer_dim),
    "other_parameters": (Annotated[str, typer.Option(
        help=f"Factored path, selected parameters outside supported layers: {', '.join(OTHER_PARAMETER_POLICIES)}.",
        rich_help_panel=_PANEL)], _DEFAULT.other_parameters),
    "whitening": (Annotated[str, typer.Option(
        help=f"Factored path: whiten each layer's gradient by its Gauss-Newton factors before projecting "
             f"({', '.join(WHITENINGS)}, with ridge DAMPING × the layer's mean eigenvalue), or none.",
        rich_help_panel=_PANEL)], "none"),
    "fit_records": (Annotated[int, typer.Option(
        help="Whitening: training records its factors are fitted on (0: all).", rich_help_panel=_PANEL)], 0),
}


def attribution_settings(*, proj_dim: int, projection: str, seed: int, bank_size: int, parameters: list[str] | None,
                         damping: str, lambda_reg: float | None, batch_size: int, dtype: str, device: str,
                         features: str, layer_dim: int, other_parameters: str, whitening: str, fit_records: int
                         ) -> AttributionSettings:
    """The :class:`AttributionSettings` of the command-line options (``--proj-dim 0``: no projection,
    ``--whitening none``: none, ``--fit-records 0``: all).

    Raises:
        typer.BadParameter: ``--damping`` is neither a number nor ``auto``.
    """
    try:
        relative: float | str = damping if damping == "auto" else float(damping)
    except ValueError:
        raise typer.BadParameter(f"--damping must be a number or auto, got {damping!r}") from None
    return AttributionSettings(proj_dim=proj_dim or None, projection=projection, seed=seed, bank_size=bank_size,
                               parameters=tuple(parameters) if parameters else None, damping=relative,
                               lambda_reg=lambda_reg, batch_size=batch_size, score_dtype=dtype, device=device,
                               features=features, layer_dim=layer_dim, other_parameters=other_parameters,
                               whitening=None if whitening == "none" else whitening, fit_records=fit_records or None)


with_attribution_settings = _with_group("settings", _ATTRIBUTION_OPTIONS, attribution_settings)
"""``command`` with its ``settings: AttributionSettings`` parameter taken from the attribution options."""
