"""Attribution quality measures, each checked against an independent computation written out here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptrace.data.shapes import COLORS, generate_shapes_world, load_mask, load_objects
from cliptrace.explain.base import Explanation, image_logit
from cliptrace.explain.metrics import (
    auc,
    completeness_error,
    gaussian_blur,
    logit_score,
    mask_overlap,
    object_mask,
    perturbation_curve,
    pointing_game,
    randomization_check,
)
from cliptrace.models import train_tokenizer
from cliptrace.models.hf_clip import HFCLIP


@pytest.fixture(scope="module")
def tiny_clip() -> HFCLIP:
    tokenizer = train_tokenizer(["a red circle", "a blue square above a green cross"] * 5, vocab_size=300,
                                context_length=16)
    return HFCLIP.from_preset("tiny", tokenizer, seed=0, image_size=16, vision_num_hidden_layers=1,
                              text_num_hidden_layers=1)


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- completeness


def test_completeness_error_is_the_relative_gap_of_each_side() -> None:
    explanation = Explanation(
        method="exact",
        logit=torch.tensor([2.0, -4.0]),
        image_map=torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[-1.0, -1.0], [-1.0, 0.0]]]),
        image_level="patch",
        text_map=torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]),
        image_constant=torch.tensor([0.5, -1.0]),  # sums 2.0 (exact) and -4.0 (exact)
        text_constant=torch.tensor([0.2, -1.0]),  # sums 2.2 (10 % off) and -3.0 (25 % off)
        interaction=torch.full((2, 5, 4), 0.1),  # sums 2.0 in both rows
    )
    errors = completeness_error(explanation)
    assert set(errors) == {"image", "text", "interaction"}
    torch.testing.assert_close(errors["image"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(errors["text"], torch.tensor([0.1, 0.25]))
    torch.testing.assert_close(errors["interaction"], torch.tensor([0.0, 1.5]))


def test_completeness_error_checks_only_what_a_method_decomposes() -> None:
    image_only = Explanation("partial", torch.tensor([1.0]), torch.ones(1, 2, 2), "patch",
                             text_map=torch.ones(1, 3), image_constant=torch.tensor([-2.0]))
    assert set(completeness_error(image_only)) == {"image"}
    saliency = Explanation("gradient", torch.tensor([1.0]), torch.ones(1, 2, 2), "patch")
    with pytest.raises(ValueError, match="not a decomposition"):
        completeness_error(saliency)


# ------------------------------------------------------------------------------------------- deletion/insertion


def test_auc_of_a_linear_curve_is_the_mean_of_its_ends() -> None:
    fractions = torch.tensor([[0.0, 0.1, 0.35, 0.5, 1.0]]).double()
    f0, f1 = 3.0, -1.0
    scores = f0 + (f1 - f0) * fractions
    torch.testing.assert_close(auc(fractions, scores), torch.tensor([0.5 * (f0 + f1)]).double())


def _blur_reference(image: np.ndarray, sigma: float) -> np.ndarray:
    """A direct 2-D convolution with an edge-clamped image, one output pixel at a time."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    channels, height, width = image.shape
    out = np.zeros_like(image)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                for i, dy in enumerate(offsets):
                    for j, dx in enumerate(offsets):
                        yy, xx = min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)
                        out[c, y, x] += kernel[i, j] * image[c, yy, xx]
    return out


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_blur_is_a_gaussian_convolution_with_clamped_edges(sigma: float) -> None:
    images = _images(2, 6, seed=1).double()
    blurred = gaussian_blur(images, sigma)
    for image, result in zip(images, blurred):
        np.testing.assert_allclose(result.numpy(), _blur_reference(image.numpy(), sigma), atol=1e-12)


def _substrate_reference(image: np.ndarray, substrate: str, sigma: float) -> np.ndarray:
    if substrate == "zero":
        return np.zeros_like(image)
    if substrate == "mean":
        return np.broadcast_to(image.mean(axis=(1, 2), keepdims=True), image.shape).copy()
    return _blur_reference(image, sigma)


def _weighted_score(weights: torch.Tensor):
    """A nonlinear score of each image that ignores which original image it perturbs."""

    def score(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh((images * weights).sum(dim=(1, 2, 3)) / 10)

    return score


def _brute_force_curve(score, images, relevance, mode, substrate, sigma, patch):
    """Each perturbed image built explicitly: rank units by (−relevance, raster index), copy pixels one by one."""
    batch, _, height, width = images.shape
    rows, columns = height // patch, width // patch
    curves = []
    for b in range(batch):
        image = images[b].numpy()
        background = _substrate_reference(image, substrate, sigma)
        values = relevance[b].flatten().tolist()
        order = sorted(range(rows * columns), key=lambda unit: (-values[unit], unit))
        curve = []
        for k in range(rows * columns + 1):
            chosen = set(order[:k])
            start, shown = (image, background) if mode == "deletion" else (background, image)
            perturbed = start.copy()
            for y in range(height):
                for x in range(width):
                    if (y // patch) * columns + x // patch in chosen:
                        perturbed[:, y, x] = shown[:, y, x]
            curve.append(float(score(torch.from_numpy(perturbed)[None], torch.tensor([b]))))
        curves.append(curve)
    return torch.tensor(curves, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("substrate", ["zero", "mean", "blur"])
def test_patch_curve_matches_explicitly_perturbed_images(mode: str, substrate: str) -> None:
    images = _images(2, 8, seed=2).double()
    weights = _images(1, 8, seed=3).double()[0]
    relevance = torch.tensor([[[0.5, 2.0, -1.0, 0.5], [0.0, 3.0, 0.5, 1.0], [0.0, 0.0, 0.0, -2.0],
                               [1.0, 1.0, 1.0, 0.5]]]).double().repeat(2, 1, 1)
    relevance[1] = relevance[1].flip(-1)
    score = _weighted_score(weights)
    curve = perturbation_curve(score, images, relevance, mode=mode, substrate=substrate, sigma=1.0,
                               batch_size=5)
    expected = _brute_force_curve(score, images, relevance, mode, substrate, 1.0, patch=2)
    torch.testing.assert_close(curve.scores, expected)
    torch.testing.assert_close(curve.fractions, (torch.arange(17) / 16).double().expand(2, -1))


def test_pixel_curve_spreads_a_patch_map_and_breaks_ties_in_raster_order() -> None:
    images = _images(1, 4, seed=4).double()
    weights = _images(1, 4, seed=5).double()[0]
    relevance = torch.tensor([[[1.0, 4.0], [-1.0, 2.0]]]).double()
    score = _weighted_score(weights)
    curve = perturbation_curve(score, images, relevance, level="pixel", batch_size=7)
    pixel_relevance = relevance.repeat_interleave(2, -2).repeat_interleave(2, -1)
    expected = _brute_force_curve(score, images, pixel_relevance, "deletion", "zero", 1.0, patch=1)
    torch.testing.assert_close(curve.scores, expected)


def test_patch_curve_of_a_pixel_map_sums_it_per_patch_and_coarse_steps_round() -> None:
    images = _images(1, 8, seed=6).double()
    weights = _images(1, 8, seed=7).double()[0]
    pixel_map = _images(1, 8, seed=8)[0, :1].double()
    score = _weighted_score(weights)
    with pytest.raises(ValueError, match="grid"):
        perturbation_curve(score, images, pixel_map)
    curve = perturbation_curve(score, images, pixel_map, grid=(4, 4), steps=3)
    sums = torch.tensor([[[pixel_map[0, 2 * r:2 * r + 2, 2 * c:2 * c + 2].sum() for c in range(4)]
                          for r in range(4)]])
    full = _brute_force_curve(score, images, sums, "deletion", "zero", 1.0, patch=2)
    torch.testing.assert_close(curve.scores, full[:, [0, 5, 11, 16]])  # round(16 k / 3)
    torch.testing.assert_close(curve.fractions, torch.tensor([[0, 5, 11, 16]]).double() / 16)


def test_a_perfect_map_beats_its_reverse() -> None:
    images = _images(1, 8, seed=9).abs().double() + 0.1

    def only_patch_five(batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return batch[:, :, 2:4, 2:4].sum(dim=(1, 2, 3))  # patch (1, 1) of the 4×4 grid, index 5

    perfect = torch.zeros(1, 4, 4).double()
    perfect[0, 1, 1] = 1.0
    deletion = perturbation_curve(only_patch_five, images, perfect)
    reverse = perturbation_curve(only_patch_five, images, -perfect)
    assert torch.all(deletion.scores[0, 1:] == 0)
    assert deletion.auc() < reverse.auc()
    inserted = perturbation_curve(only_patch_five, images, perfect, mode="insertion")
    assert inserted.auc() > perturbation_curve(only_patch_five, images, -perfect, mode="insertion").auc()
    original = images[0, :, 2:4, 2:4].sum()
    torch.testing.assert_close(deletion.normalized_auc(), deletion.auc() / original)
    torch.testing.assert_close(inserted.unperturbed, original.view(1))
    torch.testing.assert_close(deletion.auc(), (original / 32).view(1))  # a drop to 0 after 1/16: (f0 / 2) / 16


def test_logit_score_pairs_each_perturbed_image_with_its_own_text_side(tiny_clip: HFCLIP) -> None:
    images = _images(3, 16, seed=10)
    text_side = torch.nn.functional.normalize(torch.randn(3, 128, generator=torch.Generator().manual_seed(11)), dim=-1)
    relevance = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(12))
    curve = perturbation_curve(logit_score(tiny_clip, text_side), images, relevance, batch_size=4)
    with torch.no_grad():
        original = image_logit(tiny_clip, images, text_side)
        substrate = image_logit(tiny_clip, torch.zeros_like(images), text_side)
    torch.testing.assert_close(curve.scores[:, 0], original.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(curve.scores[:, -1], substrate.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- ground truth


def test_pointing_game_on_pixel_maps_with_tolerance() -> None:
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 5:7, 5:7] = True
    on, off = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    on[0, 6, 5], off[0, 2, 2] = 1.0, 1.0  # off: 3√2 ≈ 4.24 px from pixel (5, 5)
    assert pointing_game(on, mask).tolist() == [True]
    assert pointing_game(off, mask).tolist() == [False]
    assert pointing_game(off, mask, tolerance=4).tolist() == [False]
    assert pointing_game(off, mask, tolerance=5).tolist() == [True]


def test_pointing_game_on_patch_maps_uses_every_pixel_of_the_best_patch() -> None:
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 5:7, 5:7] = True
    patches = torch.zeros(2, 2, 2)
    patches[0, 1, 1] = 1.0  # rows 4–7, columns 4–7: covers the object
    patches[1, 0, 1] = 1.0  # rows 0–3: two rows above the object
    assert pointing_game(patches, mask).tolist() == [True, False]
    assert pointing_game(patches, mask, tolerance=1).tolist() == [True, False]
    assert pointing_game(patches, mask, tolerance=2).tolist() == [True, True]
    assert pointing_game(torch.zeros(2, 2, 2), mask).tolist() == [False, False]  # a tie picks patch (0, 0)


def test_mask_overlap_energy_and_top_k_iou() -> None:
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, 0, :2] = True  # two pixels
    relevance = torch.zeros(3, 4, 4)
    relevance[0, 0, 0], relevance[0, 3, 3], relevance[0, 2, 2] = 3.0, 1.0, -5.0  # top 2: (0,0), (3,3)
    relevance[1] = -1.0  # no positive mass; all tie, so the top 2 are the first two in raster order
    relevance[2, 0, 1], relevance[2, 1, 0] = 2.0, 2.0
    result = mask_overlap(relevance, mask)
    torch.testing.assert_close(result["energy"][[0, 2]], torch.tensor([0.75, 0.5]).double())
    assert math.isnan(result["energy"][1])
    torch.testing.assert_close(result["iou"], torch.tensor([1 / 3, 1.0, 1 / 3]).double())
    patch_map = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])  # spread: 1 per pixel in two patches
    spread = mask_overlap(patch_map, mask[:1])
    torch.testing.assert_close(spread["energy"], torch.tensor([0.25]).double())
    torch.testing.assert_close(spread["iou"], torch.tensor([1.0]).double())  # ties: (0,0), (0,1) first


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_world(tmp_path_factory.mktemp("shapes") / "world", n_images=6, image_size=32, seed=3)


def test_object_mask_selects_the_named_objects_pixels(shapes_world: Path) -> None:
    root = shapes_world.parent
    objects = load_objects(root)
    checked_pairs = 0
    for image_id, entries in objects.items():
        labels = load_mask(root, image_id)
        with Image.open(root / "images" / f"{image_id}.png") as image:
            pixels = np.asarray(image, dtype=np.int16)
        for k, obj in enumerate(entries, start=1):
            mask = object_mask(labels, entries, f"a {obj['size']} {obj['color']} {obj['shape']}").numpy()
            assert mask.sum() > 0 and np.array_equal(mask, labels == k)
            assert np.abs(pixels[mask] - np.array(COLORS[obj["color"]])).max() <= 12 + 10  # colour jitter + noise
            other = "large" if obj["size"] == "small" else "small"
            with pytest.raises(ValueError, match="no object"):
                object_mask(labels, entries, f"{other} {obj['color']} {obj['shape']}")
        if len(entries) == 2:
            first, second = (f"{o['color']} {o['shape']}" for o in entries)
            both = object_mask(labels, entries, f"a {first} above a {second}").numpy()
            assert np.array_equal(both, labels > 0)
            checked_pairs += 1
    assert checked_pairs > 0
    with pytest.raises(ValueError, match="no object"):
        object_mask(labels, entries, "a pink hexagon")


# ------------------------------------------------------------------------------------------- randomization


def _gradient_map(model: HFCLIP, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
    pixels = pixel_values.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(image_logit(model, pixels, text_side).sum(), pixels)
    return gradient.abs().sum(dim=1)


def test_randomization_check_separates_model_dependent_maps(tiny_clip: HFCLIP) -> None:
    before = {name: tensor.clone() for name, tensor in tiny_clip.state_dict().items()}
    images = _images(3, 16, seed=15)
    text_side = torch.nn.functional.normalize(torch.randn(3, 128, generator=torch.Generator().manual_seed(16)), dim=-1)
    gradient = randomization_check(tiny_clip, _gradient_map, images, text_side)
    assert gradient.steps == ("visual_projection", "post_layernorm", "encoder.layers.0", "pre_layernorm",
                              "embeddings")
    assert gradient.per_image.shape == (5, 3)
    assert gradient.passed()
    brightness = randomization_check(tiny_clip, lambda model, px, text: px.mean(dim=1), images, text_side)
    assert brightness.correlations == pytest.approx((1.0,) * 5)
    assert not brightness.passed()
    after = tiny_clip.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    again = randomization_check(tiny_clip, _gradient_map, images, text_side)
    assert again.correlations == gradient.correlations  # seeded
