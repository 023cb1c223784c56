"""Quality measures for input attributions: completeness, deletion/insertion curves, shapes-world ground truth and
the model-randomization sanity check.

Every function works on tensors and returns tensors with one value per image; none changes its inputs. Relevance
maps are patch maps (B, gh, gw) or pixel maps (B, H, W), as in :class:`~cliptrace.explain.base.Explanation`.
Wherever relevance has to be ranked, ties are broken by raster order (the earlier row, then the earlier column,
comes first), so every result is deterministic.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cliptrace.explain.base import Explanation, image_logit, require_hf_clip, to_patches, to_pixels
from cliptrace.models.base import DualEncoder
from cliptrace.stats import spearman

Mode = Literal["deletion", "insertion"]
Level = Literal["patch", "pixel"]
Substrate = Literal["zero", "mean", "blur"]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ExplainFn = Callable[[DualEncoder, torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_MAX_STEPS = 100
INIT_STD = 0.02  # the HF ``initializer_range``


# ---------------------------------------------------------------------------------------------------------------
# Completeness


def completeness_error(explanation: Explanation, *, floor: float = 1e-8) -> dict[str, torch.Tensor]:
    """Relative completeness error ``|Σ parts − logit| / max(|logit|, floor)`` of each pair, per side.

    Only the parts an explanation has are checked: ``"image"`` (``image_map`` summed plus ``image_constant``),
    ``"text"`` (``text_map`` summed plus ``text_constant``) and ``"interaction"`` (the whole matrix summed).
    A map without its constant is not a decomposition and is left out.

    Returns:
        Side name -> relative error, shape (B,).

    Raises:
        ValueError: The explanation has no part that claims to sum to the logit (no constant, no interaction).
    """
    logit = explanation.logit
    scale = logit.abs().clamp_min(floor)
    totals = {}
    if explanation.image_map is not None and explanation.image_constant is not None:
        totals["image"] = explanation.image_map.sum(dim=(-2, -1)) + explanation.image_constant
    if explanation.text_map is not None and explanation.text_constant is not None:
        totals["text"] = explanation.text_map.sum(dim=-1) + explanation.text_constant
    if explanation.interaction is not None:
        totals["interaction"] = explanation.interaction.sum(dim=(-2, -1))
    if not totals:
        raise ValueError(
            f"method {explanation.method!r} is not a decomposition: its explanation has no image_constant,"
            " text_constant or interaction, so there is nothing that should sum to the logit"
        )
    return {side: (total - logit).abs() / scale for side, total in totals.items()}


# ---------------------------------------------------------------------------------------------------------------
# Deletion and insertion


@dataclass(frozen=True)
class PerturbationCurve:
    """The score of progressively perturbed images (Petsiuk et al. 2018, RISE).

    Attributes:
        mode: ``"deletion"`` (fraction = share of units replaced by the substrate) or ``"insertion"`` (fraction
            = share of units revealed on top of the substrate).
        fractions: Share of the units perturbed at each step, (B, steps + 1), from 0 to 1.
        scores: The score at each step, (B, steps + 1).
    """

    mode: Mode
    fractions: torch.Tensor
    scores: torch.Tensor

    @property
    def unperturbed(self) -> torch.Tensor:
        """The score of the original images, (B,): the first step of a deletion, the last of an insertion."""
        return self.scores[:, 0] if self.mode == "deletion" else self.scores[:, -1]

    def auc(self) -> torch.Tensor:
        """The area under the curve, (B,): the headline number (lower is better for deletion, higher for insertion)."""
        return auc(self.fractions, self.scores)

    def normalized_auc(self) -> torch.Tensor:
        """:meth:`auc` divided by :attr:`unperturbed`, (B,): comparable across images whose logits differ in scale.

        Only meaningful where the unperturbed score is positive (the image matches its text side).
        """
        return self.auc() / self.unperturbed


def auc(fractions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under ``scores`` over ``fractions`` (the last dimension), e.g. (B, S) -> (B,)."""
    return torch.trapezoid(scores, fractions, dim=-1)


def logit_score(model: DualEncoder, text_side: torch.Tensor) -> ScoreFn:
    """A ``score_fn`` for :func:`perturbation_curve`: ``image_logit`` of each perturbed image with its row's text side.

    Args:
        model: The model whose logit is explained.
        text_side: (B, D), one text side per original image.
    """

    def score(pixel_values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return image_logit(model, pixel_values, text_side[rows])

    return score


def gaussian_blur(pixel_values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel of (B, C, H, W) with a normalized Gaussian of standard deviation ``sigma`` pixels.

    The kernel reaches ``ceil(3 sigma)`` pixels each way and the border is replicated (edge pixels repeat).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=pixel_values.dtype, device=pixel_values.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = pixel_values.shape[1]
    padded = F.pad(pixel_values, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def substrate_images(pixel_values: torch.Tensor, substrate: Substrate, *, sigma: float = 5.0) -> torch.Tensor:
    """What perturbed pixels become, (B, 3, H, W) in normalized space.

    ``"zero"``: 0, i.e. the dataset mean colour of the preprocessing; ``"mean"``: the image's own per-channel
    mean; ``"blur"``: :func:`gaussian_blur` of the image with ``sigma``.
    """
    if substrate == "zero":
        return torch.zeros_like(pixel_values)
    if substrate == "mean":
        return pixel_values.mean(dim=(-2, -1), keepdim=True).expand_as(pixel_values)
    if substrate == "blur":
        return gaussian_blur(pixel_values, sigma)
    raise ValueError(f"unknown substrate {substrate!r}; expected 'zero', 'mean' or 'blur'")


def perturbation_curve(
    score_fn: ScoreFn,
    pixel_values: torch.Tensor,
    relevance: torch.Tensor,
    *,
    mode: Mode = "deletion",
    level: Level = "patch",
    substrate: Substrate = "zero",
    sigma: float = 5.0,
    grid: tuple[int, int] | None = None,
    steps: int | None = None,
    batch_size: int = 64,
) -> PerturbationCurve:
    """The deletion or insertion curve of each image (Petsiuk et al. 2018).

    Units (patches or pixels) are ranked by relevance, most relevant first, ties in raster order. Deletion
    replaces the top units with the substrate step by step; insertion starts from the substrate and reveals the
    top units of the image. Step k perturbs ``round(k · n / steps)`` of the n units. All steps of all images are
    scored in batches of ``batch_size`` images under ``torch.no_grad``.

    Args:
        score_fn: ``score_fn(images (N, 3, H, W), rows (N,)) -> (N,)``, where ``rows[i]`` is the index of the
            original image that ``images[i]`` perturbs; :func:`logit_score` builds one from a model.
        pixel_values: Normalized images (B, 3, H, W).
        relevance: Patch map (B, gh, gw) or pixel map (B, H, W).
        mode: ``"deletion"`` or ``"insertion"``.
        level: ``"patch"`` ranks patches (a pixel map is summed per patch with ``to_patches``, which needs
            ``grid``); ``"pixel"`` ranks pixels (a patch map is spread evenly over its pixels with ``to_pixels``,
            so the pixels of a patch tie and go in raster order).
        substrate: See :func:`substrate_images`.
        sigma: Blur standard deviation in pixels for ``substrate="blur"``.
        grid: The (gh, gw) patch grid; needed only to rank a pixel map by patches.
        steps: Number of steps; by default one per unit, at most 100.
        batch_size: Perturbed images per call of ``score_fn``.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"unknown mode {mode!r}; expected 'deletion' or 'insertion'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batch, _, height, width = pixel_values.shape
    units = _unit_relevance(relevance, (height, width), level, grid)
    count = units.shape[-2] * units.shape[-1]
    steps = min(count, DEFAULT_MAX_STEPS) if steps is None else steps
    if not 1 <= steps <= count:
        raise ValueError(f"steps must lie in 1..{count} (the number of {level}s), got {steps}")
    ranks = _ranks(units.reshape(batch, count)).to(pixel_values.device)
    perturbed_counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * count / steps).long()
    background = substrate_images(pixel_values, substrate, sigma=sigma)
    if mode == "insertion":
        pixel_values, background = background, pixel_values  # revealing the image = deleting the substrate

    pairs = torch.cartesian_prod(torch.arange(batch), torch.arange(steps + 1))  # (B·(steps+1), 2), image-major
    scores = torch.empty(len(pairs), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            rows, step = pairs[start : start + batch_size].unbind(-1)
            rows = rows.to(pixel_values.device)
            hidden = ranks[rows] < perturbed_counts[step].to(pixel_values.device)[:, None]
            hidden = _upsample(hidden.reshape(-1, *units.shape[-2:]), (height, width))[:, None]
            images = torch.where(hidden, background[rows], pixel_values[rows])
            scores[start : start + len(rows)] = score_fn(images, rows).detach().double().cpu()
    fractions = (perturbed_counts.double() / count).expand(batch, -1)
    return PerturbationCurve(mode, fractions.clone(), scores.view(batch, steps + 1))


def _unit_relevance(
    relevance: torch.Tensor, size: tuple[int, int], level: Level, grid: tuple[int, int] | None
) -> torch.Tensor:
    """The relevance of each unit that ``level`` ranks: (B, gh, gw) for patches, (B, H, W) for pixels."""
    is_pixel_map = tuple(relevance.shape[-2:]) == tuple(size)
    if level == "pixel":
        return to_pixels(relevance, size)
    if level != "patch":
        raise ValueError(f"unknown level {level!r}; expected 'patch' or 'pixel'")
    if not is_pixel_map:
        return relevance
    if grid is None:
        raise ValueError("ranking a pixel map by patches needs grid=(rows, columns) of the patch grid")
    return to_patches(relevance, grid)


def _ranks(relevance: torch.Tensor) -> torch.Tensor:
    """Position of each unit (B, n) in descending relevance, 0 = most relevant; ties in raster order."""
    order = torch.argsort(relevance, dim=-1, descending=True, stable=True)
    positions = torch.arange(relevance.shape[-1], device=relevance.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _upsample(cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour enlargement of (N, gh, gw) to (N, H, W): pixel (y, x) takes cell (y·gh // H, x·gw // W)."""
    rows = torch.arange(size[0], device=cells.device) * cells.shape[-2] // size[0]
    columns = torch.arange(size[1], device=cells.device) * cells.shape[-1] // size[1]
    return cells[:, rows][:, :, columns]


# ---------------------------------------------------------------------------------------------------------------
# Ground truth on the shapes world

_SIZE_WORDS = ("small", "large")


def object_mask(
    label_map: np.ndarray | torch.Tensor, objects: Sequence[Mapping], name: str
) -> torch.Tensor:
    """The pixels (H, W, boolean) of the objects that a class name or caption names.

    An object is named when ``name`` contains its ``"COLOR SHAPE"`` as whole words, e.g. ``"red circle"``,
    ``"a large red circle"`` or ``"a red circle above a blue square"`` (both objects). A size word right before
    the colour must match the object's size.

    Args:
        label_map: The image's label map from :func:`cliptrace.data.shapes.load_mask` (0 background, k the
            k-th object).
        objects: The image's objects from :func:`cliptrace.data.shapes.load_objects`, in label order.
        name: A class name or a caption.

    Raises:
        ValueError: No object of the image is named.
    """
    labels = torch.as_tensor(np.asarray(label_map))
    words = " ".join(re.findall(r"[a-z]+", name.lower()))
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    named = False
    for label, obj in enumerate(objects, start=1):
        pattern = rf"(?:\b(\w+) )?\b{re.escape(obj['color'])} {re.escape(obj['shape'])}\b"
        for match in re.finditer(pattern, words):
            size = match.group(1)
            if size not in _SIZE_WORDS or size == obj["size"]:
                mask |= labels == label
                named = True
    if not named:
        present = ", ".join(f"{obj['color']} {obj['shape']}" for obj in objects) or "none"
        raise ValueError(f"no object of this image is named by {name!r} (objects: {present})")
    return mask


def pointing_game(relevance: torch.Tensor, mask: torch.Tensor, *, tolerance: int = 0) -> torch.Tensor:
    """Whether the most relevant location of each map falls on the object (Zhang et al. 2016), (B,) boolean.

    The maximum of a pixel map is a pixel; the maximum of a patch map is the patch, a hit when any of its pixels
    is on the object. With ``tolerance`` t > 0, the mask is first dilated by a disc of radius t pixels (Zhang et
    al. use 15 px), so a maximum within t pixels of the object counts. Ties go to the first cell in raster order.

    Args:
        relevance: Patch map (B, gh, gw) or pixel map (B, H, W).
        mask: Object pixels (B, H, W), boolean.
        tolerance: Dilation radius in pixels.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    batch, height, width = mask.shape
    target = _dilate(mask, tolerance)
    cells = relevance.reshape(batch, -1)
    best = torch.zeros_like(cells, dtype=torch.bool)
    best[torch.arange(batch), cells.argmax(dim=-1)] = True  # argmax returns the first maximum
    at_best = _upsample(best.view(batch, *relevance.shape[-2:]), (height, width))
    return (at_best & target).flatten(1).any(dim=-1)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a boolean mask (B, H, W) by every pixel within Euclidean distance ``radius``."""
    if radius == 0:
        return mask.bool()
    offsets = torch.arange(-radius, radius + 1)
    disc = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()
    grown = F.conv2d(mask.float()[:, None], disc[None, None], padding=radius)
    return grown[:, 0] > 0


def mask_overlap(relevance: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much of each map lies on the object, (B,) per measure.

    ``"energy"``: the energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the positive
    relevance mass that lies inside the mask (NaN for a map with no positive mass). ``"iou"``: the
    intersection over union of the k most relevant pixels with the mask, k = the mask's pixel count (signed
    relevance, most positive first, ties in raster order; NaN for an empty mask). A patch map is first spread
    evenly over its pixels.

    Args:
        relevance: Patch map (B, gh, gw) or pixel map (B, H, W).
        mask: Object pixels (B, H, W), boolean.
    """
    batch = mask.shape[0]
    pixels = to_pixels(relevance, tuple(mask.shape[-2:])).reshape(batch, -1).double()
    inside = mask.reshape(batch, -1).bool()
    positive = pixels.clamp_min(0)
    energy = (positive * inside).sum(-1) / positive.sum(-1)  # 0 / 0 = NaN without positive mass
    size = inside.sum(-1)
    top = _ranks(pixels) < size[:, None]
    overlap = (top & inside).sum(-1).double()
    iou = overlap / (2 * size - overlap)  # 0 / 0 = NaN for an empty mask
    return {"energy": energy, "iou": iou}


# ---------------------------------------------------------------------------------------------------------------
# Model-randomization sanity check


@dataclass(frozen=True)
class RandomizationResult:
    """Cascading model randomization (Adebayo et al. 2018).

    Attributes:
        steps: The vision-tower blocks randomized, in order (each step keeps the earlier ones randomized).
        correlations: Mean over images of the Spearman correlation of |original map| with |map| after each step.
        per_image: The correlations of each image, (steps, B).
    """

    steps: tuple[str, ...]
    correlations: tuple[float, ...]
    per_image: torch.Tensor

    def passed(self, threshold: float = 0.5) -> bool:
        """Whether the maps depend on the model: the correlation after full randomization is below ``threshold``.

        A NaN correlation (a constant map) does not pass.
        """
        return bool(self.correlations[-1] < threshold)


def randomization_check(
    model: DualEncoder,
    explain_fn: ExplainFn,
    pixel_values: torch.Tensor,
    text_side: torch.Tensor,
    *,
    seed: int = 0,
    std: float = INIT_STD,
) -> RandomizationResult:
    """Cascading randomization of the vision tower, top block first, comparing maps after each step.

    Works on a deep copy of the model; ``model`` is not changed. The steps are the visual projection, the final
    LayerNorm, each encoder layer from the top down, the pre-LayerNorm and the embeddings (patch, class and
    position). Each step re-initializes its block as HF initializes CLIP: weights and the class embedding from
    a normal of standard deviation ``std`` (drawn from a generator seeded with ``seed``), biases to zero and
    LayerNorms to weight one and bias zero (so on a freshly initialized model the LayerNorm steps change
    nothing).

    Args:
        model: An :class:`~cliptrace.models.hf_clip.HFCLIP`.
        explain_fn: ``explain_fn(model, pixel_values, text_side)`` -> map (B, ...), one per image.
        pixel_values: Normalized images (B, 3, H, W).
        text_side: (B, D).
        seed: Seeds the new weights.
        std: Standard deviation of the new weights.
    """
    copied = copy.deepcopy(require_hf_clip(model, "the randomization check"))
    vision = copied.model.vision_model
    blocks = [("visual_projection", copied.model.visual_projection), ("post_layernorm", vision.post_layernorm)]
    blocks += [(f"encoder.layers.{i}", layer) for i, layer in reversed(list(enumerate(vision.encoder.layers)))]
    blocks += [("pre_layernorm", vision.pre_layrnorm), ("embeddings", vision.embeddings)]
    generator = torch.Generator().manual_seed(seed)
    original = explain_fn(copied, pixel_values, text_side).detach().abs().flatten(1)
    per_image = []
    for _, block in blocks:
        _reinitialize(block, generator, std)
        randomized = explain_fn(copied, pixel_values, text_side).detach().abs().flatten(1)
        per_image.append(spearman(original, randomized))
    per_image = torch.stack(per_image)
    return RandomizationResult(
        steps=tuple(name for name, _ in blocks),
        correlations=tuple(per_image.mean(dim=-1).tolist()),
        per_image=per_image,
    )


@torch.no_grad()
def _reinitialize(block: nn.Module, generator: torch.Generator, std: float) -> None:
    """HF-style re-initialization in place: normal(0, std) weights, zero biases, LayerNorm to one and zero."""
    for module in block.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm):
                parameter.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                parameter.zero_()
            else:
                fresh = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std
                parameter.copy_(fresh)
