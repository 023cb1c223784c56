"""The TRAK engine against independent computations written here: explicit loops, autograd, numpy float64 inverses.

Nothing below compares with numbers the engine produced earlier: every expectation is recomputed from the
definitions (DESIGN.md §4) — the CLIP margin f_i and loss weight Q_i by a Python loop over the bank, gradients by
``loss.backward()`` one example at a time, kernels by ``np.linalg.inv``/``np.linalg.pinv`` in float64.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cliptrace.models import HFCLIP, train_tokenizer
from cliptrace.trak import (
    ClipMargin,
    DenseProjector,
    EmbeddingBank,
    EnsembleScorer,
    FeatureStore,
    ImageClassificationMargin,
    StoreMismatchError,
    TRAKer,
    solve_kernel,
)
from cliptrace.trak.gradients import per_example_gradients, select_parameters
from cliptrace.trak import scoring
from cliptrace.trak.scoring import gram_matrix
from cliptrace.files import create_npy_atomic
from cliptrace.trak.store import STORE_VERSION

DEVICE = "cpu"
VOCAB, CONTEXT = 20, 5
HIDDEN_BIASES = ["image_hidden.bias", "text_hidden.bias", "image_proj.bias", "logit_scale"]  # p = 6 + 5 + 4 + 1


# --- a tiny open_clip-style model -----------------------------------------------------------------------------


class TinyCLIP(nn.Module):
    """open_clip-shaped: ``forward(image, text)`` -> (unnormalized image features, text features, exp(scale))."""

    def __init__(self, seed: int = 0, dim: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.image_hidden = nn.Linear(12, 6)
        self.image_proj = nn.Linear(6, dim)
        self.token_embedding = nn.Embedding(VOCAB, 5)
        self.text_hidden = nn.Linear(5, 5)
        self.text_proj = nn.Linear(5, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(4.0)))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.7)
            self.logit_scale.fill_(math.log(4.0) + 0.1 * seed)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = self.image_proj(torch.tanh(self.image_hidden(image.flatten(1))))
        text_features = self.text_proj(torch.tanh(self.text_hidden(self.token_embedding(text).mean(1))))
        return image_features, text_features, self.logit_scale.exp()


def tiny_pairs(count: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random (image (3, 2, 2), token ids (CONTEXT,)) pairs."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 2, 2, generator=generator, dtype=dtype)
    texts = torch.randint(0, VOCAB, (count, CONTEXT), generator=generator)
    return images, texts


def tiny_embed(model: nn.Module, images: torch.Tensor, texts: torch.Tensor):
    """Normalized embeddings and the multiplier of :class:`TinyCLIP`, by hand."""
    image_features, text_features, scale = model(images, texts)
    return (image_features / image_features.norm(dim=-1, keepdim=True),
            text_features / text_features.norm(dim=-1, keepdim=True), scale)


# --- the tiny HuggingFace CLIP of cliptrace ---------------------------------------------------------------------

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star near a cross",
            "a large purple square below a circle", "an orange cross left of a dark star"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=12)


def small_hf_model(tokenizer, seed: int = 0) -> HFCLIP:
    """The tiny preset shrunk further (1 layer, width 32, 8-d embeddings) for float64 end-to-end references."""
    return HFCLIP.from_preset("tiny", tokenizer, image_size=16, attn_implementation="eager", seed=seed,
                              vision_num_hidden_layers=1, text_num_hidden_layers=1, vision_hidden_size=32,
                              vision_intermediate_size=64, text_hidden_size=32, text_intermediate_size=64,
                              text_max_position_embeddings=12, projection_dim=8)


def hf_pairs(model: HFCLIP, count: int, seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    side = model.model.config.vision_config.image_size
    images = torch.randn(count, 3, side, side, generator=generator, dtype=dtype)
    words = "red green blue circle square star small large above below".split()
    rng = np.random.default_rng(seed)
    texts = model.tokenize([" ".join(rng.choice(words, size=int(rng.integers(2, 6)))) for _ in range(count)])
    return images, texts


def hf_embed(model: HFCLIP, images: torch.Tensor, texts: dict):
    return (model.encode_image(images), model.encode_text(texts["input_ids"], texts["attention_mask"]),
            model.logit_scale.exp())


def rows_of(texts, rows):
    rows = torch.as_tensor(rows, dtype=torch.long)
    return {k: v[rows] for k, v in texts.items()} if isinstance(texts, dict) else texts[rows]


def batches(images: torch.Tensor, texts, size: int) -> list:
    """``(images, texts)`` batches of ``size`` in order."""
    return [(images[s : s + size], rows_of(texts, range(s, min(s + size, images.shape[0]))))
            for s in range(0, images.shape[0], size)]


# --- the independent reference ------------------------------------------------------------------------------


def reference_margins(embed: Callable, model: nn.Module, image: torch.Tensor, text, index: int,
                      bank: tuple[torch.Tensor, torch.Tensor, list[int]]):
    """(m_img, m_txt, p_img, p_txt) of one pair by a Python loop over the bank, skipping bank entries of ``index``."""
    bank_images, bank_texts, bank_indices = bank
    text = {k: v[None] for k, v in text.items()} if isinstance(text, dict) else text[None]
    phi, psi, tau = embed(model, image[None], text)
    phi, psi = phi[0], psi[0]
    positive = tau * torch.dot(phi, psi)
    to_texts = [tau * torch.dot(phi, bank_texts[j]) for j, i in enumerate(bank_indices) if i != index]
    to_images = [tau * torch.dot(bank_images[j], psi) for j, i in enumerate(bank_indices) if i != index]
    sum_texts = sum(torch.exp(s) for s in to_texts)
    sum_images = sum(torch.exp(s) for s in to_images)
    m_img = positive - torch.log(sum_texts)
    m_txt = positive - torch.log(sum_images)
    p_img = torch.exp(positive) / (torch.exp(positive) + sum_texts)
    p_txt = torch.exp(positive) / (torch.exp(positive) + sum_images)
    return m_img, m_txt, p_img, p_txt


@torch.no_grad()
def reference_bank(embed: Callable, model: nn.Module, images: torch.Tensor, texts, indices: Iterable[int]):
    indices = list(indices)
    phi, psi, _ = embed(model, images[indices], rows_of(texts, indices))
    return phi.clone(), psi.clone(), indices


def selected_names(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Parameter names in module order (written here, not with the engine's selector)."""
    if patterns is None:
        return [name for name, _ in model.named_parameters()]
    return [name for name, _ in model.named_parameters()
            if any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)]


def reference_features(embed: Callable, model: nn.Module, images, texts, indices: list[int], bank,
                       names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(X (B, p), Q (B,)): one ``backward()`` per example of the explicit margin, and Q from bank probabilities."""
    parameters = dict(model.named_parameters())
    rows, weights = [], []
    for b, index in enumerate(indices):
        model.zero_grad(set_to_none=True)
        text = {k: v[b] for k, v in texts.items()} if isinstance(texts, dict) else texts[b]
        m_img, m_txt, p_img, p_txt = reference_margins(embed, model, images[b], text, index, bank)
        (m_img + m_txt).backward()
        rows.append(torch.cat([parameters[n].grad.reshape(-1) if parameters[n].grad is not None
                               else torch.zeros(parameters[n].numel(), dtype=parameters[n].dtype)
                               for n in names]).detach().double().numpy())
        weights.append(float((1 - (p_img + p_txt) / 2).detach()))
    model.zero_grad(set_to_none=True)
    return np.stack(rows), np.array(weights)


def reference_kernel(x: np.ndarray, lam: float) -> np.ndarray:
    """W = X (XᵀX + λI)⁻¹ by an explicit float64 inverse; the pseudo-inverse form (X⁺)ᵀ when k > n and λ = 0."""
    n, k = x.shape
    if k > n and lam == 0:
        return np.linalg.pinv(x).T
    return x @ np.linalg.inv(x.T @ x + lam * np.eye(k))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def quiet_traker(model: nn.Module, task, n: int, save_dir: Path, **kwargs) -> TRAKer:
    return TRAKer(model=model, task=task, train_set_size=n, save_dir=str(save_dir), device=DEVICE,
                  logging_level=logging.WARNING, **kwargs)


# === 1. the CLIP margin formula ================================================================================


def _check_clip_margin(model, embed, images, texts, bank_size, grad_patterns, rtol):
    n = images.shape[0]
    task = ClipMargin(bank_size=bank_size, seed=3)
    requested = []

    def batches_for(indices: torch.Tensor):
        requested.append(indices.tolist())
        chosen = indices.tolist()
        for s in range(0, len(chosen), 3):
            rows = chosen[s : s + 3]
            yield images[rows], rows_of(texts, rows), torch.tensor(rows)

    task.set_bank_source(n, batches_for)
    task.prepare(model)
    # The bank is drawn uniformly and seeded: distinct sorted training indices, the requested count.
    (drawn,) = requested
    assert drawn == sorted(set(drawn)) and len(drawn) == min(bank_size, n) and 0 <= drawn[0] and drawn[-1] < n
    bank = reference_bank(embed, model, images, texts, drawn)

    indices = list(range(n))
    indices[1] = -1  # a target: it meets the whole bank
    params = {name: p.detach() for name, p in model.named_parameters()}
    sigmoid_q = []
    for b, index in enumerate(indices):
        text = {k: v[b] for k, v in texts.items()} if isinstance(texts, dict) else texts[b]
        m_img, m_txt, _, _ = reference_margins(embed, model, images[b], text, index, bank)
        value = task.output(model, params, (images[b], text), torch.tensor(index))
        torch.testing.assert_close(value.detach(), (m_img + m_txt).detach(), rtol=rtol, atol=rtol)
        sigmoid_q.append(float(1 - (torch.sigmoid(m_img) + torch.sigmoid(m_txt)).detach() / 2))

    names = selected_names(model, grad_patterns)
    assert select_parameters(model, grad_patterns) == names
    expected_x, expected_q = reference_features(embed, model, images, texts, indices, bank, names)
    index_tensor = torch.tensor(indices)
    gradients = per_example_gradients(task, model, names, (images, texts), index_tensor, chunk_size=4)
    assert gradients.shape == expected_x.shape
    assert relative_error(gradients.double().numpy(), expected_x) < rtol
    q = task.loss_weight(model, (images, texts), index_tensor)
    np.testing.assert_allclose(q.double().numpy(), expected_q, rtol=rtol, atol=rtol)  # 1 − mean probability
    np.testing.assert_allclose(q.double().numpy(), sigmoid_q, rtol=rtol, atol=rtol)  # 1 − mean σ(margin)
    assert ((q > 0) & (q < 1)).all()


@pytest.mark.parametrize("bank_size", [10, 4])
def test_clip_margin_equals_the_explicit_formula_for_an_open_clip_style_module(bank_size: int) -> None:
    model = TinyCLIP(seed=0).double()
    images, texts = tiny_pairs(10, seed=1)
    _check_clip_margin(model, tiny_embed, images, texts, bank_size, None, rtol=1e-6)


def test_clip_margin_equals_the_explicit_formula_for_the_hf_clip_model(hf_tokenizer) -> None:
    model = HFCLIP.from_preset("tiny", hf_tokenizer, image_size=32, attn_implementation="eager", seed=0).eval()
    images, texts = hf_pairs(model, 6, seed=2)
    patterns = ["model.visual_projection.*", "model.text_projection.*", "model.logit_scale"]
    _check_clip_margin(model, hf_embed, images, texts, 6, patterns, rtol=2e-4)


def test_clip_margin_excludes_the_pair_itself_by_training_index() -> None:
    """A hand-made bank: the pair's own entry is skipped by training index, other entries count."""
    model = TinyCLIP(seed=3).double()
    images, texts = tiny_pairs(5, seed=4)
    bank = reference_bank(tiny_embed, model, images, texts, range(5))
    task = ClipMargin()
    task.bank = EmbeddingBank(bank[0].float(), bank[1].float(), torch.arange(5))
    params = {name: p.detach() for name, p in model.named_parameters()}
    rounded = (bank[0].float().double(), bank[1].float().double(), bank[2])
    for index in range(5):
        m_img, m_txt, _, _ = reference_margins(tiny_embed, model, images[index], texts[index], index, rounded)
        value = task.output(model, params, (images[index], texts[index]), torch.tensor(index))
        torch.testing.assert_close(value, (m_img + m_txt).detach(), rtol=1e-10, atol=1e-10)
        # Relabelling the pair as another training index keeps its own entry in the bank: f changes.
        other = task.output(model, params, (images[index], texts[index]), torch.tensor(99))
        assert abs(float(other - value)) > 1e-3


def test_clip_margin_without_a_bank_is_a_clear_error() -> None:
    model = TinyCLIP().double()
    images, texts = tiny_pairs(2, seed=0)
    with pytest.raises(RuntimeError, match="get_embeddings"):
        ClipMargin().loss_weight(model, (images, texts), torch.arange(2))


# === 2. acceptance: exact scores with no projection =============================================================


def _bank_loader(images, texts):
    return batches(images, texts, 4)


def _run_clip_traker(model, train, targets, save_dir, patterns, lam, checkpoints, batch=5):
    n, t = train[0].shape[0], targets[0].shape[0]
    traker = quiet_traker(model, "clip", n, save_dir, proj_dim=None, grad_wrt=patterns, lambda_reg=lam,
                          score_dtype=torch.float64)
    traker.task.get_embeddings(model, _bank_loader(*train), batch_size=1, size=10 * n)
    for model_id, state in enumerate(checkpoints):
        traker.load_checkpoint(state, model_id=model_id)
        for images, texts in batches(*train, batch):
            traker.featurize(batch=(images, texts), num_samples=images.shape[0])
    traker.finalize_features()
    for model_id, state in enumerate(checkpoints):
        traker.start_scoring_checkpoint("exp", state, model_id=model_id, num_targets=t)
        for images, texts in batches(*targets, 3):
            traker.score(batch=(images, texts), num_samples=images.shape[0])
    return traker, traker.finalize_scores("exp")


def _reference_clip_scores(embed, model_factory, train, targets, patterns, lam, checkpoints):
    """Q̄ ⊙ mean_m W_m Φ_mᵀ from scratch: a fresh model per checkpoint, its own bank, explicit autograd."""
    n, t = train[0].shape[0], targets[0].shape[0]
    scores, qs, leverages = [], [], []
    for state in checkpoints:
        model = model_factory()
        model.load_state_dict(state)
        model.eval()
        bank = reference_bank(embed, model, *train, range(n))
        names = selected_names(model, patterns)
        x, q = reference_features(embed, model, *train, list(range(n)), bank, names)
        phi, _ = reference_features(embed, model, *targets, [-1] * t, bank, names)
        w = reference_kernel(x, lam)
        scores.append(w @ phi.T)
        leverages.append(np.einsum("ik,ik->i", w, x))
        qs.append(q)
    q_bar = np.mean(qs, axis=0)
    return q_bar[:, None] * np.mean(scores, axis=0), q_bar * np.mean(leverages, axis=0), x.shape[1]


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("regime", ["p<n", "p>n"])
def test_unprojected_scores_equal_a_brute_force_float64_reference(tmp_path: Path, regime: str, lam: float) -> None:
    """Acceptance: with no projection on a tiny model, scores equal an independent reference to 1e-5 relative."""
    patterns = HIDDEN_BIASES if regime == "p<n" else None
    n = 30 if regime == "p<n" else 12
    model = TinyCLIP(seed=0).double()
    train, targets = tiny_pairs(n, seed=1), tiny_pairs(7, seed=2)
    checkpoint = copy.deepcopy(model.state_dict())
    traker, scores = _run_clip_traker(model, train, targets, tmp_path, patterns, lam, [checkpoint])
    expected, influence, p = _reference_clip_scores(tiny_embed, lambda: TinyCLIP().double(), train, targets,
                                                    patterns, lam, [checkpoint])
    assert (p < n) == (regime == "p<n")
    assert scores.shape == (n, 7) and scores.dtype == np.float64
    assert relative_error(scores, expected) <= 1e-5
    assert relative_error(traker.self_influence(), influence) <= 1e-5


@pytest.mark.parametrize(("regime", "lam"), [("p<n", 0.0), ("p>n", 0.05)])
def test_two_checkpoint_ensemble_is_mean_loss_weight_times_mean_kernel_score(tmp_path, regime, lam) -> None:
    patterns = HIDDEN_BIASES if regime == "p<n" else None
    n = 30 if regime == "p<n" else 12
    model = TinyCLIP(seed=0).double()
    checkpoints = [copy.deepcopy(TinyCLIP(seed=s).double().state_dict()) for s in (5, 6)]
    assert not torch.equal(checkpoints[0]["image_hidden.weight"], checkpoints[1]["image_hidden.weight"])
    train, targets = tiny_pairs(n, seed=1), tiny_pairs(5, seed=2)
    traker, scores = _run_clip_traker(model, train, targets, tmp_path, patterns, lam, checkpoints)
    expected, influence, _ = _reference_clip_scores(tiny_embed, lambda: TinyCLIP().double(), train, targets,
                                                    patterns, lam, checkpoints)
    assert relative_error(scores, expected) <= 1e-5
    assert relative_error(traker.self_influence(), influence) <= 1e-5
    single, _, _ = _reference_clip_scores(tiny_embed, lambda: TinyCLIP().double(), train, targets, patterns, lam,
                                          checkpoints[:1])
    assert relative_error(single, expected) > 1e-2  # the second checkpoint does count


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_unprojected_hf_clip_scores_equal_a_brute_force_float64_reference(hf_tokenizer, tmp_path, lam) -> None:
    """A (shrunk) HF CLIP tiny model in float64, projection heads and temperature only (p = 513 > n = 10)."""
    patterns = ["model.visual_projection.*", "model.text_projection.*", "model.logit_scale"]
    model = small_hf_model(hf_tokenizer).double()
    train, targets = hf_pairs(model, 10, seed=1, dtype=torch.float64), hf_pairs(model, 4, seed=2,
                                                                                 dtype=torch.float64)
    checkpoint = copy.deepcopy(model.state_dict())
    _, scores = _run_clip_traker(model, train, targets, tmp_path, patterns, lam, [checkpoint], batch=4)
    expected, _, p = _reference_clip_scores(hf_embed, lambda: small_hf_model(hf_tokenizer).double(), train, targets,
                                            patterns, lam, [checkpoint])
    assert p > 10
    assert relative_error(scores, expected) <= 1e-5


# === 3. determinism ===========================================================================================


def _featurize(save_dir, model, train, order, batch, seed=0, targets=None, features="exact"):
    n = train[0].shape[0]
    traker = quiet_traker(model, "clip", n, save_dir, proj_dim=16, projector_seed=seed, lambda_reg=0.0,
                          score_dtype=torch.float64, features=features)
    traker.task.get_embeddings(model, _bank_loader(*train), size=n)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for s in range(0, n, batch):
        rows = order[s : s + batch]
        traker.featurize(batch=(train[0][rows], rows_of(train[1], rows)), inds=rows)
    features = np.array(traker.store.features("0")[0])
    scores = None
    if targets is not None:
        traker.finalize_features()
        t = targets[0].shape[0]
        traker.start_scoring_checkpoint("exp", model.state_dict(), model_id=0, num_targets=t)
        target_order = np.arange(t)[::-1].copy() if batch < n else np.arange(t)
        for s in range(0, t, batch):
            rows = target_order[s : s + batch]
            traker.score(batch=(targets[0][rows], rows_of(targets[1], rows)), inds=rows)
        scores = traker.finalize_scores("exp")
    return features, scores


@pytest.mark.parametrize("features", ["exact", "factored"])
def test_same_seed_gives_identical_features_and_another_seed_other_features(tmp_path: Path, features: str) -> None:
    model = TinyCLIP(seed=0).float()
    train = tiny_pairs(24, seed=1, dtype=torch.float32)
    order = np.arange(24)
    first, _ = _featurize(tmp_path / "a", model, train, order, 6, seed=7, features=features)
    second, _ = _featurize(tmp_path / "b", TinyCLIP(seed=0).float(), train, order, 6, seed=7, features=features)
    other, _ = _featurize(tmp_path / "c", TinyCLIP(seed=0).float(), train, order, 6, seed=8, features=features)
    assert first.shape == (24, 16) and np.abs(first).max() > 0
    assert np.array_equal(first, second)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("features", ["exact", "factored"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_batch_size_and_featurize_order_do_not_change_features_or_scores(tmp_path: Path, dtype, tolerance,
                                                                         features: str) -> None:
    """Float64 pins the claim to 1e-6; float32 (rounding of batched kernels, ~4e-7 here) gets 1e-5."""
    train, targets = tiny_pairs(40, seed=1, dtype=dtype), tiny_pairs(6, seed=2, dtype=dtype)
    whole, whole_scores = _featurize(tmp_path / "a", TinyCLIP(seed=0).to(dtype), train, np.arange(40), 40,
                                     targets=targets, features=features)
    permutation = np.random.default_rng(0).permutation(40)
    shuffled, shuffled_scores = _featurize(tmp_path / "b", TinyCLIP(seed=0).to(dtype), train, permutation, 3,
                                           targets=targets, features=features)
    assert relative_error(shuffled, whole) <= tolerance
    assert relative_error(shuffled_scores, whole_scores) <= tolerance
    assert np.abs(whole_scores).max() > 0


# === 4. Johnson–Lindenstrauss projection =======================================================================


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_projection_preserves_inner_products_within_the_jl_bound(kind: str) -> None:
    dim, k, count = 20_000, 1024, 48
    generator = torch.Generator().manual_seed(11)
    basis = torch.randn(8, dim, generator=generator, dtype=torch.float64)  # shared directions: correlated pairs
    mixing = torch.randn(count, 8, generator=generator, dtype=torch.float64) * 0.5
    vectors = mixing @ basis + torch.randn(count, dim, generator=generator, dtype=torch.float64)
    vectors *= torch.rand(count, 1, generator=generator, dtype=torch.float64) + 0.5
    projected = DenseProjector(dim, k, kind=kind, seed=3, block_rows=4096).project(vectors)
    assert projected.shape == (count, k) and projected.dtype == torch.float64

    exact = (vectors @ vectors.T).numpy()
    approx = (projected @ projected.T).numpy()
    norms = np.diag(exact)
    # Var⟨Pᵀg, Pᵀh⟩ = (|g|²|h|² + ⟨g,h⟩²)/k for Gaussian entries (Rademacher: at most that); the diagonal is
    # |Pᵀg|² with variance 2|g|⁴/k.
    sigma = np.sqrt((np.outer(norms, norms) + exact**2) / k)
    z = (approx - exact) / sigma
    upper = np.triu_indices(count)
    assert np.abs(z[upper]).max() < 6
    assert np.mean(np.abs(z[upper]) > 3) < 0.02
    assert abs(np.mean(z[upper])) < 0.3  # unbiased
    assert 0.7 < np.std(z[upper]) < 1.3
    off = np.triu_indices(count, 1)
    cosines = exact[off] / np.sqrt(np.outer(norms, norms))[off]
    assert np.abs(cosines).max() > 0.5  # the check covers strongly correlated pairs, not only near-orthogonal ones


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_projector_matrix_is_seeded_and_project_is_a_matrix_product(kind: str) -> None:
    dim, k = 2500, 64  # 3 blocks, the last one partial
    first = DenseProjector(dim, k, kind=kind, seed=5, block_rows=1000)
    again = DenseProjector(dim, k, kind=kind, seed=5, block_rows=1000)
    other = DenseProjector(dim, k, kind=kind, seed=6, block_rows=1000)
    matrix = first.matrix()
    assert matrix.shape == (dim, k)
    assert torch.equal(matrix, again.matrix())
    assert not torch.equal(matrix, other.matrix())
    if kind == "rademacher":
        assert set(torch.unique(matrix * math.sqrt(k)).tolist()) == {-1.0, 1.0}
    else:
        assert abs(float((matrix * math.sqrt(k)).std()) - 1) < 0.02 and abs(float(matrix.mean())) < 0.01

    g = torch.randn(5, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = g @ matrix.double()
    torch.testing.assert_close(first.project(g), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert first.project(g.float()).dtype == torch.float32

    uncached = DenseProjector(dim, k, kind=kind, seed=5, block_rows=1000, cache_bytes=0)
    assert torch.equal(uncached.project(g), first.project(g))
    assert torch.equal(uncached.project(g), uncached.project(g))
    with pytest.raises(ValueError, match="dimension"):
        first.project(torch.zeros(2, dim + 1))


# === 5. the feature store =====================================================================================


SETTINGS = {"featurizer": "exact", "projection": {"kind": "rademacher", "seed": 0}, "output": {"name": "m"}}


def test_reopening_a_store_with_other_settings_names_the_differing_key(tmp_path: Path) -> None:
    FeatureStore(tmp_path, 8, 4, SETTINGS)
    FeatureStore(tmp_path, 8, 4, copy.deepcopy(SETTINGS))  # same settings: fine
    changed = copy.deepcopy(SETTINGS)
    changed["projection"]["seed"] = 1
    with pytest.raises(StoreMismatchError, match=r"projection\.seed: 0 -> 1"):
        FeatureStore(tmp_path, 8, 4, changed)
    with pytest.raises(StoreMismatchError, match="proj_dim: 4 -> 5"):
        FeatureStore(tmp_path, 8, 5, SETTINGS)
    with pytest.raises(StoreMismatchError, match="train_size: 8 -> 9"):
        FeatureStore(tmp_path, 9, 4, SETTINGS)
    with pytest.raises(StoreMismatchError, match="dtype"):
        FeatureStore(tmp_path, 8, 4, SETTINGS, dtype="float64")
    assert FeatureStore.reopen(tmp_path).settings["projection"] == SETTINGS["projection"]


def test_add_checkpoint_with_another_fingerprint_raises(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, 8, 4, SETTINGS)
    store.add_checkpoint("0", "aaaa")
    store.add_checkpoint("0", "aaaa")
    with pytest.raises(StoreMismatchError, match="other weights"):
        store.add_checkpoint("0", "bbbb")
    with pytest.raises(StoreMismatchError, match="other weights"):
        FeatureStore(tmp_path, 8, 4, SETTINGS).add_checkpoint("0", "bbbb")


def test_a_store_of_another_version_is_refused_with_both_versions(tmp_path: Path) -> None:
    FeatureStore(tmp_path, 8, 4, SETTINGS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(StoreMismatchError, match=f"store version 1, this cliptrace reads version {STORE_VERSION}"):
        FeatureStore.reopen(tmp_path)


def test_a_reopened_store_lists_exactly_the_missing_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features, weights = rng.normal(size=(8, 4)).astype(np.float32), rng.random(8).astype(np.float32)
    store = FeatureStore(tmp_path, 8, 4, SETTINGS)
    store.add_checkpoint("ck", "f")
    done = np.array([5, 0, 3])
    store.write("ck", done, features[done], weights[done])
    del store
    reopened = FeatureStore(tmp_path, 8, 4, SETTINGS)
    assert reopened.checkpoint_ids() == ["ck"]
    assert reopened.missing("ck").tolist() == [1, 2, 4, 6, 7]
    assert not reopened.is_complete("ck")
    with pytest.raises(ValueError, match="5 of 8 examples missing"):
        reopened.features("ck")
    rest = reopened.missing("ck")
    reopened.write("ck", rest, features[rest], weights[rest])
    assert reopened.is_complete("ck") and reopened.missing("ck").size == 0
    stored_features, stored_weights = FeatureStore.reopen(tmp_path).features("ck")
    assert np.array_equal(stored_features, features) and np.array_equal(stored_weights, weights)


def test_traker_resumes_an_interrupted_featurization(tmp_path: Path) -> None:
    n = 20
    train = tiny_pairs(n, seed=1, dtype=torch.float32)

    def make(save_dir: Path) -> TRAKer:
        model = TinyCLIP(seed=0).float()
        traker = quiet_traker(model, "clip", n, save_dir, proj_dim=8)
        traker.task.get_embeddings(model, _bank_loader(*train), size=n)
        traker.load_checkpoint(model.state_dict(), model_id="only")
        return traker

    uninterrupted = make(tmp_path / "one")
    for images, texts in batches(*train, 4):
        uninterrupted.featurize(batch=(images, texts), num_samples=images.shape[0])
    expected = np.array(uninterrupted.store.features("only")[0])

    interrupted = make(tmp_path / "two")
    for images, texts in batches(*train, 4)[:2]:
        interrupted.featurize(batch=(images, texts), num_samples=images.shape[0])
    del interrupted
    resumed = make(tmp_path / "two")
    assert resumed.store.missing("only").tolist() == list(range(8, n))
    for images, texts in batches(*train, 7):
        resumed.featurize(batch=(images, texts), num_samples=images.shape[0])
    assert resumed.store.is_complete("only")
    features = np.array(resumed.store.features("only")[0])
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert np.array_equal(features[:8], expected[:8])

    # Another projection on the same save_dir, or other weights under the same model id, are refused.
    with pytest.raises(StoreMismatchError, match="proj_dim"):
        quiet_traker(TinyCLIP(seed=0).float(), "clip", n, tmp_path / "two", proj_dim=9)
    with pytest.raises(StoreMismatchError, match="other weights"):
        resumed.load_checkpoint(TinyCLIP(seed=1).float().state_dict(), model_id="only")


# === 6. scoring ================================================================================================


def test_solve_kernel_refuses_a_singular_gram_matrix_with_lambda_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4))
    x[:, 3] = x[:, 2]  # duplicate column: XᵀX is singular
    with pytest.raises(ValueError, match=r"not positive definite.*lambda_reg > 0"):
        solve_kernel(x, 0.0, torch.float64)
    kernel = solve_kernel(x, 0.5, torch.float64, block_rows=3)
    assert kernel.is_factor
    factor = kernel.matrix.numpy()
    np.testing.assert_allclose(factor, np.tril(factor))
    np.testing.assert_allclose(factor @ factor.T, x.T @ x + 0.5 * np.eye(4), rtol=1e-12, atol=1e-12)
    x = rng.normal(size=(4, 10))
    x[3] = x[2]  # k > n with a duplicated row: XXᵀ is singular
    with pytest.raises(ValueError, match="not positive definite"):
        solve_kernel(x, 0.0, torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_solve_kernel_with_more_features_than_examples_keeps_w_equal_to_the_pseudo_inverse(lam: float) -> None:
    rng = np.random.default_rng(1)
    x, phi = rng.normal(size=(6, 15)), rng.normal(size=(3, 15))
    assert np.linalg.matrix_rank(x.T @ x) < 15  # XᵀX itself is singular here
    kernel = solve_kernel(x, lam, torch.float64)
    assert not kernel.is_factor
    w = kernel.matrix.numpy()
    assert np.isfinite(w).all()
    expected = np.linalg.pinv(x).T if lam == 0 else x @ np.linalg.inv(x.T @ x + lam * np.eye(15))
    assert relative_error(w @ phi.T, expected @ phi.T) < 1e-9
    np.testing.assert_allclose(w, expected, rtol=1e-8, atol=1e-10)
    w32 = solve_kernel(x, lam).matrix.numpy()
    assert w32.dtype == np.float32 and relative_error(w32, expected) < 1e-4


@pytest.mark.parametrize("block_rows", [1, 3, 10, 64])
def test_gram_matrix_summed_over_row_blocks_of_a_memory_map_equals_xtx(tmp_path: Path, block_rows: int) -> None:
    x = np.random.default_rng(2).normal(size=(10, 4))
    np.save(tmp_path / "x.npy", x)
    gram = gram_matrix(np.load(tmp_path / "x.npy", mmap_mode="r"), torch.float64, block_rows=block_rows)
    assert gram.dtype == torch.float64
    np.testing.assert_allclose(gram.numpy(), x.T @ x, rtol=1e-13, atol=1e-13)
    gram32 = gram_matrix(torch.from_numpy(x.astype(np.float32)), torch.float32, block_rows=block_rows)
    assert gram32.dtype == torch.float64 and relative_error(gram32.numpy(), x.T @ x) < 1e-6


def _random_ensemble(n=15, k=5, t=7, m=2, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, k)) for _ in range(m)]
    qs = [rng.random(n) for _ in range(m)]
    phis = [rng.normal(size=(t, k)) for _ in range(m)]
    return xs, qs, phis


def _memory_maps(directory: Path, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    for index, array in enumerate(arrays):
        np.save(directory / f"{name}{index}.npy", array)
    return [np.load(directory / f"{name}{index}.npy", mmap_mode="r") for index in range(len(arrays))]


def _streaming_scorer(tmp_path: Path, xs, qs, lam: float, block_rows: int, block_size: int = 3) -> EnsembleScorer:
    """A float64 scorer over memory-mapped features and loss weights, as the store hands them out."""
    features = _memory_maps(tmp_path, "x", xs)
    kernels = [solve_kernel(x, lam, torch.float64, block_rows=block_rows) for x in features]
    return EnsembleScorer(kernels, features, _memory_maps(tmp_path, "q", qs), block_size=block_size,
                          block_rows=block_rows)


ENSEMBLES = {"k<n": {"n": 15, "k": 5}, "k>n": {"n": 6, "k": 9}}


STREAMING = [(3, 16), (64, scoring.PIECE_BYTES)]  # (rows per block, bytes per copied piece): 16 B is one row


@pytest.mark.parametrize(("block_rows", "piece_bytes"), STREAMING)
@pytest.mark.parametrize("lam", [0.0, 0.2])
@pytest.mark.parametrize("regime", ["k<n", "k>n"])
def test_streamed_scores_and_top_k_equal_a_brute_force_reference(tmp_path, monkeypatch, regime, lam, block_rows,
                                                                   piece_bytes) -> None:
    monkeypatch.setattr(scoring, "PIECE_BYTES", piece_bytes)
    xs, qs, phis = _random_ensemble(**ENSEMBLES[regime], t=7)
    n = xs[0].shape[0]
    full = np.mean(qs, 0)[:, None] * np.mean([reference_kernel(x, lam) @ p.T for x, p in zip(xs, phis)], 0)
    scorer = _streaming_scorer(tmp_path, xs, qs, lam, block_rows)
    targets = _memory_maps(tmp_path, "phi", phis)
    np.testing.assert_allclose(scorer.score(targets).numpy(), full, rtol=1e-9, atol=1e-12)
    with create_npy_atomic(tmp_path / "scores.npy", np.float64, full.shape) as out:
        scorer.score([torch.from_numpy(p) for p in phis], out=out)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), full, rtol=1e-9, atol=1e-12)

    top = scorer.top_k(targets, 4)
    order = np.argsort(-full, axis=0, kind="stable")
    assert np.array_equal(top.proponents.numpy(), order[:4].T)
    assert np.array_equal(top.opponents.numpy(), order[::-1][:4].T)
    np.testing.assert_allclose(top.proponent_scores.numpy(), np.take_along_axis(full, order[:4], 0).T, rtol=1e-9)
    np.testing.assert_allclose(top.opponent_scores.numpy(), np.take_along_axis(full, order[::-1][:4], 0).T,
                               rtol=1e-9)

    exclude = np.array([order[0, 0], -1, order[1, 2], 3, -1, order[-1, 5], 0])
    for k in (1, 4, n - 1):
        top = scorer.top_k(targets, k, exclude=torch.from_numpy(exclude))
        for column, leave_out in enumerate(exclude):
            kept = [i for i in range(n) if i != leave_out]
            ranked = sorted(kept, key=lambda i: -full[i, column])
            assert top.proponents[column].tolist() == ranked[:k]
            assert top.opponents[column].tolist() == ranked[::-1][:k]
            np.testing.assert_allclose(top.proponent_scores[column].numpy(), full[ranked[:k], column], rtol=1e-9)
    assert scorer.top_k(targets, 100, exclude=torch.from_numpy(exclude)).proponents.shape == (7, n - 1)
    assert scorer.top_k(targets, 100).proponents.shape == (7, n)


@pytest.mark.parametrize(("block_rows", "piece_bytes"), STREAMING)
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("regime", ["k<n", "k>n"])
def test_streamed_self_influence_is_mean_loss_weight_times_mean_leverage(tmp_path, monkeypatch, regime, lam,
                                                                         block_rows, piece_bytes) -> None:
    monkeypatch.setattr(scoring, "PIECE_BYTES", piece_bytes)
    xs, qs, _ = _random_ensemble(**ENSEMBLES[regime], m=3, seed=2)
    leverage = [np.einsum("ik,ik->i", reference_kernel(x, lam), x) for x in xs]  # diag(X(XᵀX + λI)⁻¹Xᵀ)
    expected = np.mean(qs, 0) * np.mean(leverage, 0)
    scorer = _streaming_scorer(tmp_path, xs, qs, lam, block_rows)
    np.testing.assert_allclose(scorer.self_influence().numpy(), expected, rtol=1e-9)


def test_ensemble_scorer_refuses_kernels_that_do_not_fit_the_features() -> None:
    xs, qs, phis = _random_ensemble(n=8, k=3, m=2)
    kernels = [solve_kernel(x, 0.1, torch.float64) for x in xs]
    with pytest.raises(ValueError, match="does not fit"):
        EnsembleScorer(kernels, [x[:, :2] for x in xs], qs)
    with pytest.raises(ValueError, match="disagree in shape"):
        EnsembleScorer(kernels, [xs[0], xs[1][:5]], qs)
    with pytest.raises(ValueError, match="each of the 2 checkpoints"):
        EnsembleScorer(kernels, xs[:1], qs)
    with pytest.raises(ValueError, match="out has shape"):
        EnsembleScorer(kernels, xs, qs).score(phis, out=np.zeros((8, 2)))


# === 7. image classification ===================================================================================


class TinyClassifier(nn.Module):
    def __init__(self, seed: int = 0, hidden: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Linear(6, 4) if hidden is None else nn.Sequential(nn.Linear(6, hidden), nn.Tanh(),
                                                                          nn.Linear(hidden, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(1))


def _classification_reference(model, images, labels, names, temperature=1.0):
    parameters = dict(model.named_parameters())
    rows, fs, qs = [], [], []
    for b in range(images.shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model(images[b : b + 1])[0]
        y = int(labels[b])
        f = logits[y] - torch.log(sum(torch.exp(logits[c]) for c in range(logits.shape[0]) if c != y))
        f.backward()
        rows.append(torch.cat([parameters[n].grad.reshape(-1) for n in names]).detach().numpy())
        fs.append(float(f.detach()))
        exps = [math.exp(float(z) / temperature) for z in logits.detach()]
        qs.append(1 - exps[y] / sum(exps))
    model.zero_grad(set_to_none=True)
    return np.stack(rows), np.array(fs), np.array(qs)


def _classification_data(count: int, seed: int, classes: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 2, 3, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, classes, (count,), generator=generator)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_image_classification_margin_matches_a_hand_computation(temperature: float) -> None:
    model = TinyClassifier().double()
    images, labels = _classification_data(9, 0, 4)
    names = [name for name, _ in model.named_parameters()]
    _, f, q = _classification_reference(model, images, labels, names, temperature)
    task = ImageClassificationMargin(temperature=temperature)
    params = {name: p.detach() for name, p in model.named_parameters()}
    values = [float(task.output(model, params, (images[b], labels[b]), torch.tensor(b))) for b in range(9)]
    np.testing.assert_allclose(values, f, rtol=1e-12)
    np.testing.assert_allclose(task.loss_weight(model, (images, labels), torch.arange(9)).numpy(), q, rtol=1e-12)


def test_image_classification_margin_per_example_gradients_match_autograd() -> None:
    model = TinyClassifier().double()
    images, labels = _classification_data(9, 0, 4)
    names = [name for name, _ in model.named_parameters()]
    x, _, _ = _classification_reference(model, images, labels, names)
    gradients = per_example_gradients(ImageClassificationMargin(), model, names, (images, labels), torch.arange(9))
    np.testing.assert_allclose(gradients.numpy(), x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_image_classification_traker_scores_equal_a_brute_force_reference(tmp_path: Path, lam: float) -> None:
    model = TinyClassifier(hidden=5).double()  # p = 53 > n = 20; the last layer's shift invariance costs 6 ranks
    images, labels = _classification_data(26, 1, 3)
    train, targets = (images[:20], labels[:20]), (images[20:], labels[20:])
    traker = quiet_traker(model, "image_classification", 20, tmp_path, proj_dim=None, lambda_reg=lam, score_dtype=torch.float64)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for s in range(0, 20, 6):
        traker.featurize(batch=(train[0][s : s + 6], train[1][s : s + 6]), num_samples=min(6, 20 - s))
    traker.finalize_features()
    traker.start_scoring_checkpoint("cls", model.state_dict(), model_id=0, num_targets=6)
    traker.score(batch=targets, num_samples=6)
    scores = traker.finalize_scores("cls")

    names = [name for name, _ in model.named_parameters()]
    x, _, q = _classification_reference(model, *train, names)
    phi, _, _ = _classification_reference(model, *targets, names)
    expected = q[:, None] * (reference_kernel(x, lam) @ phi.T)
    assert relative_error(scores, expected) <= 1e-5
