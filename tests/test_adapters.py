"""Every model adapter against independent computations, like timm's tests over every model: HF CLIP, SigLIP,
open_clip (a custom ViT config; marked ``open_clip``) and the frozen-backbone dual encoder (LiT).

Each test recomputes its expectation here, from the model's own forward pass and the definitions, never from numbers
the code under test printed:

1. factored TRAK features = the projected exact per-example gradients (one ``autograd.grad`` per example of a model
   output written out below), for every trainable parameter the default policy covers;
2. the exact decomposition's image and text contributions plus constants (and SigLIP's bias) = the real logit;
3. ``save`` then :func:`cliptrace.models.load_model` gives back every tensor bit for bit, and the same outputs;
4. a few Adam steps of ``model.objective``'s loss lower the loss, as a loop over pairs recomputes it;
5. TRAK finds planted near-duplicates: each one is the top proponent of its original.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, ViTConfig

from cliptrace.explain import explain
from cliptrace.models import FrozenBackboneDualEncoder, HFCLIP, SigLIPAdapter, load_model, train_tokenizer
from cliptrace.models.base import DualEncoder
from cliptrace.notices import CliptraceWarning
from cliptrace.trak import TRAKer
from cliptrace.trak.clip_call import eager_attention
from cliptrace.trak.factored import FactoredFeaturizer
from cliptrace.trak.features import ExactFeaturizer
from cliptrace.trak.outputs import ClipMargin, EmbeddingBank, SigmoidPairLogit, output_for_objective
from test_trak_factored import assert_blocks_equal_projected_gradients

IMAGE_SIZE = 16  # 2×2 patches of 8×8 in every family
CONTEXT = 16
WORDS = "red green blue yellow purple circle square triangle cross star small large above below left right".split()
CAPTIONS = ["a red circle", "a small blue square above a green cross", "two yellow triangles", "a purple cross"]
ADAPTERS = ["hf_clip", "siglip", pytest.param("open_clip", marks=pytest.mark.open_clip), "frozen"]
# The frozen dual encoder with both backbones fine-tuned (ViT + BERT parameters trainable too), where it matters.
FROZEN_UNLOCKED = ["frozen_unlocked"]

# open_clip: a custom ViT config (``OpenCLIPAdapter.from_config``), built without open_clip's registry.
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _tokenizer():
    return train_tokenizer(CAPTIONS + random_captions(200, seed=0), vocab_size=400, context_length=CONTEXT)


def _hf_sizes() -> dict:
    return dict(image_size=IMAGE_SIZE, vision_num_hidden_layers=1,
                text_num_hidden_layers=1, vision_hidden_size=32, vision_intermediate_size=64, text_hidden_size=32,
                text_intermediate_size=64, text_max_position_embeddings=CONTEXT)


def build(adapter: str, dtype: torch.dtype = torch.float32) -> DualEncoder:
    """A tiny seeded model of ``adapter`` in ``dtype``, in eval mode, with its default (sdpa) attention: HF's eager
    attention computes its softmax in float32 even in a float64 model (DESIGN.md §4), which would cap every float64
    comparison with the real forward pass near 1e-8."""
    if adapter == "hf_clip":
        model = HFCLIP.from_preset("tiny", _tokenizer(), seed=0, projection_dim=16, **_hf_sizes())
    elif adapter == "siglip":
        model = SigLIPAdapter.from_preset("siglip-tiny", _tokenizer(), seed=0, **_hf_sizes())
    elif adapter == "open_clip":
        pytest.importorskip("open_clip", reason="open_clip is an optional extra: cliptrace[open_clip]")
        from cliptrace.models import OpenCLIPAdapter

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = OpenCLIPAdapter.from_config(OPEN_CLIP_TINY, model_name="tiny-vit")
    elif adapter in ("frozen", "frozen_unlocked"):
        locked = adapter == "frozen"
        tokenizer = _tokenizer()
        vision = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32)
        text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=CONTEXT)
        model = FrozenBackboneDualEncoder.from_configs(vision, text, tokenizer, projection_dim=16, seed=0,
                                                       lock_image=locked, lock_text=locked)
    else:
        raise ValueError(adapter)
    return model.to(dtype).eval()


def perturb(model: DualEncoder, seed: int = 1, size: float = 0.1) -> None:
    """Non-trivial LayerNorm, bias and embedding values (fresh models have ones and zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "logit" not in name and "log_scale" not in name:
                parameter.add_(size * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def random_captions(count: int, seed: int) -> list[str]:
    """``count`` random captions of 2 to 4 words (padded rows of different lengths)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 5)))) for _ in range(count)]


def random_pairs(model: DualEncoder, count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` random images and the tokens of :func:`random_captions`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=model.logit_scale.dtype)
    return images, model.tokenize(random_captions(count, seed))


def rows(tokens: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {key: value[index] for key, value in tokens.items()}


def trainable(model: DualEncoder) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def bias_of(model: DualEncoder) -> float:
    return 0.0 if model.logit_bias is None else float(model.logit_bias.detach())


# --- the independent references ------------------------------------------------------------------------------


def reference_terms(model: DualEncoder, image: torch.Tensor, tokens: dict[str, torch.Tensor], index: int,
                    bank: EmbeddingBank | None) -> list[torch.Tensor]:
    """The terms of the per-pair model output of DESIGN.md §4 written out for one pair from ``encode_image`` and
    ``encode_text``: the two halves (image→texts, text→images) of the CLIP margin against the bank without the pair
    itself (softmax models), or SigLIP's pair logit alone."""
    phi = model.encode_image(image[None])[0]
    psi = model.encode_text(tokens["input_ids"][None], tokens["attention_mask"][None])[0]
    tau = model.logit_scale.exp()
    positive = tau * (phi @ psi)
    if model.logit_bias is not None:
        return [positive + model.logit_bias.reshape(())]
    keep = [k for k in range(bank.indices.shape[0]) if int(bank.indices[k]) != index]
    to_texts = torch.stack([tau * (phi @ bank.text_embeddings[k]) for k in keep])
    to_images = torch.stack([tau * (bank.image_embeddings[k] @ psi) for k in keep])
    return [positive - torch.logsumexp(to_texts, 0), positive - torch.logsumexp(to_images, 0)]


def reference_output(model: DualEncoder, image: torch.Tensor, tokens: dict[str, torch.Tensor], index: int,
                     bank: EmbeddingBank | None) -> torch.Tensor:
    """f of one pair: the sum of :func:`reference_terms`."""
    return sum(reference_terms(model, image, tokens, index, bank))


def loop_gradients(model: DualEncoder, images, tokens, indices: list[int], bank, names: list[str]) -> torch.Tensor:
    """Per-example gradients of :func:`reference_output`, one ``autograd.grad`` per example, columns in ``names``
    order (zeros for a parameter the output does not use)."""
    parameters = dict(model.named_parameters())
    out = []
    for b, index in enumerate(indices):
        value = reference_output(model, images[b], rows(tokens, b), index, bank)
        grads = torch.autograd.grad(value, [parameters[n] for n in names], allow_unused=True)
        out.append(torch.cat([torch.zeros(parameters[n].numel(), dtype=value.dtype) if g is None else g.flatten()
                              for n, g in zip(names, grads)]))
    return torch.stack(out)


def brute_force_loss(model: DualEncoder, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> float:
    """The objective's loss by a loop over every (image, text) pair in float64 Python arithmetic: symmetric InfoNCE
    ½·mean_i[−log softmax over texts] + ½·mean_i[−log softmax over images], or SigLIP's
    −(1/N) Σ_i Σ_j log σ(z_ij s_ij) with z_ii = 1, z_ij = −1."""
    with torch.no_grad():
        phi = model.encode_image(images).double().tolist()
        psi = model.encode_text(**tokens).double().tolist()
        tau = math.exp(float(model.logit_scale))
    n = len(phi)
    s = [[tau * sum(a * b for a, b in zip(phi[i], psi[j])) + bias_of(model) for j in range(n)] for i in range(n)]
    if model.logit_bias is not None:
        total = 0.0
        for i in range(n):
            for j in range(n):
                z = 1.0 if i == j else -1.0
                total += math.log1p(math.exp(-z * s[i][j]))  # −log σ(z s)
        return total / n
    image_side = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    text_side = sum(-s[i][i] + math.log(sum(math.exp(s[j][i]) for j in range(n))) for i in range(n)) / n
    return (image_side + text_side) / 2


# === 1. factored TRAK features = projected exact per-example gradients ===========================================


@pytest.mark.parametrize("adapter", ADAPTERS + FROZEN_UNLOCKED)
def test_factored_and_exact_features_equal_projected_per_example_gradients(adapter: str) -> None:
    model = build(adapter, torch.float64)
    perturb(model)
    images, tokens = random_pairs(model, 3, seed=2)
    indices = [1, -1, 4]
    output = output_for_objective(model.objective)
    bank = None
    if model.objective.uses_bank:
        assert isinstance(output, ClipMargin)
        generator = torch.Generator().manual_seed(3)
        dim = model.encode_image(images[:1]).shape[-1]
        embeddings = F.normalize(torch.randn(2, 5, dim, generator=generator, dtype=torch.float64), dim=-1)
        bank = output.bank = EmbeddingBank(embeddings[0], embeddings[1], torch.tensor([0, 1, 4, 6, 9]))
    else:
        assert isinstance(output, SigmoidPairLogit)
    names = trainable(model)

    with eager_attention(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CliptraceWarning)
        featurizer = FactoredFeaturizer(model, output, proj_dim=None, layer_dim=6)  # the default policy: factored
        features, weights = featurizer.features((images, tokens), torch.tensor(indices))
        exact = loop_gradients(model, images, tokens, indices, bank, names)

    # Coverage: every trainable parameter is in a hooked layer or a raw-parameter block, each exactly once; the
    # ones whose uses have no op rule (exact fallback) are named in a warning, and nothing else is warned about.
    in_layers = [name for layer in featurizer.layers for name in layer.parameter_names]
    raw = [block.name for block in featurizer.raw]
    assert featurizer.parameter_names == names
    assert sorted(in_layers + raw) == sorted(names) and len(set(in_layers) & set(raw)) == 0
    warned = {name for warning in caught if issubclass(warning.category, CliptraceWarning)
              for name in str(warning.message).rsplit(": ", 1)[1].split(", ")}
    assert warned <= set(raw)
    assert warned == set()  # every use of a raw parameter of these four adapters has an op rule: no exact fallback
    # With "exclude", the one warning names exactly the parameters outside hooked layers.
    with pytest.warns(CliptraceWarning) as excluded:
        FactoredFeaturizer(model, output, proj_dim=None, layer_dim=6, other_parameters="exclude")
    named = set(str(excluded[0].message).rsplit(": ", 1)[1].split(", "))
    assert named == set(raw)

    # Every block equals P_o G P_iᵀ of the exact per-example gradient G, and the blocks tile the features.
    assert features.dtype == torch.float64
    assert features.shape[1] == sum(block.size for block in featurizer.layers + featurizer.raw)
    assert_blocks_equal_projected_gradients(featurizer, features, exact)

    # The exact path (vmap of grad, no projection) is the same per-example gradient over every trainable parameter.
    with eager_attention(model):
        exact_path, _ = ExactFeaturizer(model, output, proj_dim=None).features((images, tokens), torch.tensor(indices))
    assert float((exact_path - exact).norm() / exact.norm()) < 1e-10

    # Q = 1 − σ(f) for SigLIP, 1 − ½[σ(m_img) + σ(m_txt)] for the CLIP margin: the mean of 1 − σ over the terms.
    with torch.no_grad(), eager_attention(model):
        expected = torch.stack([1 - torch.stack([torch.sigmoid(term) for term in reference_terms(
            model, images[b], rows(tokens, b), indices[b], bank)]).mean() for b in range(3)])
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)


# === 2. the exact decomposition is complete ======================================================================


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_decomposition_contributions_and_constants_sum_to_the_real_logit(adapter: str, dtype) -> None:
    model = build(adapter, dtype)
    if adapter == "frozen" and not hasattr(type(model), "image_tower"):
        pytest.skip("FrozenBackboneDualEncoder does not describe its towers yet (branch frozen-towers)")
    perturb(model, size=0.2)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    images, tokens = random_pairs(model, 2, seed=5)
    captions = random_captions(2, seed=5)
    with torch.no_grad():
        phi = model.encode_image(images)
        psi = model.encode_text(**tokens)
        logit = model.logit_scale.exp() * (phi * psi).sum(-1) + bias_of(model)
        result = explain(model, images, captions, method="decomposition")
    bias = bias_of(model)  # SigLIP's learned bias is one more constant of the logit
    image_total = result.image_map.flatten(1).sum(1) + result.image_constant + bias
    text_total = result.text_map.sum(1) + result.text_constant + bias
    pair_total = result.interaction.sum((1, 2)) + bias
    scale = logit.abs() if dtype == torch.float64 else model.logit_scale.exp().expand(2)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for total in (image_total, text_total, pair_total):
        assert ((total - logit).abs() / scale).max() < tolerance
    assert result.image_map.shape == (2, 2, 2)
    assert result.image_map.abs().sum() > 0 and result.text_map.abs().sum() > 0


# === 3. save/load is bit-exact ===================================================================================


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_save_and_load_model_give_back_every_tensor_and_the_same_outputs(adapter: str, tmp_path: Path) -> None:
    model = build(adapter)
    perturb(model)
    model.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model").eval()
    assert type(loaded) is type(model)
    saved, back = model.state_dict(), loaded.state_dict()
    assert sorted(back) == sorted(saved)
    for name, tensor in saved.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == trainable(model)
    images, tokens = random_pairs(model, 3, seed=7)
    again = loaded.tokenize(random_captions(3, seed=7))
    assert all(torch.equal(again[key], tokens[key]) for key in ("input_ids", "attention_mask"))
    with torch.no_grad():
        for ours, theirs in zip(model(images, **tokens), loaded(images, **tokens)):
            assert torch.equal(ours, theirs)
    assert loaded.preprocess.size == model.preprocess.size


# === 4. a short training run lowers the loss =====================================================================


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_few_adam_steps_of_the_objective_lower_the_brute_force_loss(adapter: str) -> None:
    model = build(adapter)
    images, tokens = random_pairs(model, 6, seed=11)
    before = brute_force_loss(model, images, tokens)
    with torch.no_grad():
        objective_loss = float(model.objective.loss(*model(images, **tokens)))
    assert objective_loss == pytest.approx(before, rel=1e-5)  # the objective is the loss the loop computes
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        model.objective.loss(*model(images, **tokens)).backward()
        optimizer.step()
        model.clamp_logit_scale()
    model.eval()
    after = brute_force_loss(model, images, tokens)
    assert after < before


# === 5. TRAK finds planted near-duplicates =======================================================================

TRAIN_SIZE, PLANTED = 24, {0: 22, 1: 23}  # original -> its near-duplicate


def planted_set(model: DualEncoder) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """22 random pairs and near-duplicates of the first two (same caption, image + 5 % noise) at 22 and 23."""
    images, tokens = random_pairs(model, TRAIN_SIZE, seed=13)
    generator = torch.Generator().manual_seed(17)
    for original, duplicate in PLANTED.items():
        images[duplicate] = images[original] + 0.05 * torch.randn(images[original].shape, generator=generator)
        for key in tokens:
            tokens[key][duplicate] = tokens[key][original]
    return images, tokens


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_trak_scores_each_planted_duplicate_as_the_top_proponent_of_its_original(adapter: str,
                                                                                 tmp_path: Path) -> None:
    model = build(adapter)
    images, tokens = planted_set(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(10):  # fit the training set a little: the full set is one batch
        optimizer.zero_grad()
        model.objective.loss(*model(images, **tokens)).backward()
        optimizer.step()
        model.clamp_logit_scale()
    model.eval()
    task = output_for_objective(model.objective, bank_size=TRAIN_SIZE)
    traker = TRAKer(model, task, TRAIN_SIZE, save_dir=tmp_path, device="cpu", proj_dim=512, lambda_reg=None,
                    logging_level=logging.WARNING)
    batches = [(images[s:s + 8], rows(tokens, slice(s, s + 8))) for s in range(0, TRAIN_SIZE, 8)]
    if isinstance(task, ClipMargin):
        task.get_embeddings(model, batches, size=TRAIN_SIZE)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CliptraceWarning)
        traker.load_checkpoint(state, model_id=0)
        for batch in batches:
            traker.featurize(batch=batch, num_samples=batch[0].shape[0])
        traker.finalize_features()
        originals = list(PLANTED)
        traker.start_scoring_checkpoint("planted", state, model_id=0, num_targets=len(originals))
        traker.score(batch=(images[originals], rows(tokens, originals)), num_samples=len(originals))
        scores = traker.finalize_scores("planted")
    assert scores.shape == (TRAIN_SIZE, len(originals))
    for column, (original, duplicate) in enumerate(PLANTED.items()):
        others = np.delete(np.arange(TRAIN_SIZE), original)  # the target itself is a training pair: leave it out
        ranked = others[np.argsort(-scores[others, column])]
        assert ranked[0] == duplicate, (original, scores[:, column])
        # not by a hair: seeded runs over four data seeds gave margins of 13× to 170× over the runner-up
        assert scores[duplicate, column] > 3 * abs(scores[ranked[1], column])
