"""The factored feature path against exact per-example gradients: every layer type, raw parameters and
``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``), HF CLIP, the frozen-backbone dual encoder, the
final sketch, the policies for other parameters, and the errors. open_clip models: tests/test_open_clip_trak.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import BertConfig, ViTConfig

from cliptrace.notices import CliptraceWarning
from cliptrace.models import FrozenBackboneDualEncoder, HFCLIP, train_tokenizer
from cliptrace.trak import TRAKer
from cliptrace.trak import multihead
from cliptrace.trak.batches import map_batch
from cliptrace.trak.clip_call import eager_attention
from cliptrace.trak.factored import FactoredFeaturizer, FactoredLayer, make_featurizer
from cliptrace.trak.features import ExactFeaturizer
from cliptrace.trak.kfac import fit_statistics, whitenings
from cliptrace.trak.outputs import ClipMargin, EmbeddingBank, ImageClassificationMargin, ModelOutput
from cliptrace.trak.projection import CountSketchProjector
from cliptrace.trak.raw_parameters import RawParameter

CAPTIONS = ["a red circle", "a small blue square above a green cross", "two yellow triangles", "a purple cross"]


class LayerZoo(nn.Module):
    """Every supported layer type: general and patch convolutions, embeddings with padding_idx and broadcast
    position ids, a LayerNorm, linear layers with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)
        self.patch = nn.Conv2d(3, 5, kernel_size=4, stride=4, bias=False)
        self.tokens = nn.Embedding(11, 6, padding_idx=0)
        self.positions = nn.Embedding(16, 6)
        self.norm = nn.LayerNorm(6)
        self.hidden = nn.Linear(6, 7)
        self.head = nn.Linear(12, 3, bias=False)
        self.register_buffer("position_ids", torch.arange(16)[None])
        with torch.no_grad():  # non-trivial LayerNorm parameters
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.conv(images).flatten(2).transpose(1, 2)  # (B, 16, 6)
        ids = (images[:, 0].flatten(1)[:, :16] > 0).long() * torch.arange(16) % 11  # zeros are padding
        hidden = grid + self.tokens(ids) + self.positions(self.position_ids)
        pooled = torch.tanh(self.hidden(self.norm(hidden))).mean(1)
        patches = self.patch(images).mean((2, 3))
        return self.head(torch.cat([pooled, patches], 1))


class RawUses(nn.Module):
    """Raw parameters in every use the factored path has a rule for: a class token expanded to the batch, position
    embeddings added, an ``nn.TransformerEncoderLayer`` (packed attention in-projection, out-projection), a
    cross-attention, a projection matrix ``x @ P``, a scalar scale through ``exp``, a sliced bias through
    ``F.linear``."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.class_token = nn.Parameter(torch.randn(4))
        self.positions = nn.Parameter(torch.randn(5, 4))
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(4, 2, batch_first=True)
        self.query = nn.Parameter(torch.randn(2, 4))
        self.proj = nn.Parameter(torch.randn(4, 3))
        self.head_weight = nn.Parameter(torch.randn(3, 4))
        self.head_bias = nn.Parameter(torch.randn(6))
        self.log_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(images.shape[0], -1, 4)
        x = torch.cat([self.class_token.view(1, 1, -1).expand(x.shape[0], -1, -1), x], 1) + self.positions
        mask = (x[..., 0] > 0.5) & (torch.arange(x.shape[1]) > 0)  # padded positions, never the class token
        if self.batch_first:
            x = self.encoder(x, src_key_padding_mask=mask)
        else:
            x = self.encoder(x.transpose(0, 1), src_key_padding_mask=mask).transpose(0, 1)
        pooled = self.cross(self.query.expand(x.shape[0], -1, -1) + 0 * x[:, :2], x, x)[0].mean(1)
        scaled = (x[:, 0] @ self.proj) * self.log_scale.exp()
        return scaled + F.linear(pooled, self.head_weight, self.head_bias[:3])


def raw_case(batch_first: bool) -> tuple[nn.Module, ModelOutput, tuple, list[str]]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    model = RawUses(batch_first).double().eval()
    return model, ImageClassificationMargin(), (images, torch.tensor([0, 2, 1])), [
        "class_token", "positions", "query", "proj", "head_weight", "head_bias", "log_scale",
        "encoder.self_attn.in_proj_weight", "encoder.self_attn.in_proj_bias", "encoder.self_attn.out_proj.weight",
        "encoder.self_attn.out_proj.bias", "cross.in_proj_weight", "cross.in_proj_bias", "cross.out_proj.weight",
        "cross.out_proj.bias"]


def zoo_case() -> tuple[nn.Module, ModelOutput, tuple, list[str]]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    return LayerZoo().double(), ImageClassificationMargin(), (images, labels), []


def _clip_batch(model, count: int = 3):
    generator = torch.Generator().manual_seed(2)
    size = model.preprocess.size
    images = torch.randn(count, 3, size, size, generator=generator, dtype=torch.float64)
    tokens = model.tokenize(CAPTIONS[:count])  # different lengths: padded rows
    assert (tokens["attention_mask"] == 0).any()
    return images, tokens


def _clip_margin(model, indices: list[int]) -> ClipMargin:
    generator = torch.Generator().manual_seed(3)
    dim = model.encode_image(torch.zeros(1, 3, model.preprocess.size, model.preprocess.size,
                                         dtype=torch.float64)).shape[-1]
    output = ClipMargin()
    bank = torch.nn.functional.normalize(torch.randn(2, 6, dim, generator=generator, dtype=torch.float64), dim=-1)
    output.bank = EmbeddingBank(bank[0], bank[1], torch.tensor(indices))
    return output


def hf_clip_case(hidden_act: str) -> tuple[nn.Module, ModelOutput, tuple, list[str]]:
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    model = HFCLIP.from_preset("tiny", tokenizer, seed=0, hidden_act=hidden_act, image_size=16,
                               vision_num_hidden_layers=1, text_num_hidden_layers=1).double().eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # non-trivial LayerNorm and bias values
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model, _clip_margin(model, [0, 1, 5, 7, 8, 9]), _clip_batch(model), [
        "model.logit_scale", "model.vision_model.embeddings.class_embedding"]


def frozen_case() -> tuple[nn.Module, ModelOutput, tuple, list[str]]:
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    vision = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16)
    model = FrozenBackboneDualEncoder.from_configs(vision, text, tokenizer, projection_dim=8, seed=0).double().eval()
    return model, _clip_margin(model, [0, 1, 5, 7, 8, 9]), _clip_batch(model), ["log_scale"]


CASES: dict[str, Callable[[], tuple[nn.Module, ModelOutput, tuple, list[str]]]] = {
    "layer_zoo": zoo_case,
    "hf_clip_quick_gelu": lambda: hf_clip_case("quick_gelu"),
    "hf_clip_gelu": lambda: hf_clip_case("gelu"),
    "frozen_backbone_dual_encoder": frozen_case,
    "raw_parameters": lambda: raw_case(batch_first=True),
}


def reference_block(layer: FactoredLayer | RawParameter, gradient: torch.Tensor) -> torch.Tensor:
    """P_o G P_iᵀ (linear-type layers), P_r G P_cᵀ (raw matrices) or the raw gradient (LayerNorm, other raw
    parameters) from one example's exact gradient."""
    if isinstance(layer, RawParameter):
        if layer.parameter.dim() != 2:
            return gradient
        matrix = gradient.reshape(layer.parameter.shape)
        if layer.row_projection is not None:
            matrix = layer.row_projection @ matrix
        if layer.column_projection is not None:
            matrix = matrix @ layer.column_projection.T
        return matrix.flatten()
    if isinstance(layer.module, nn.LayerNorm):
        return gradient
    d_out, d_in = layer.widths()
    weight = gradient[: d_out * d_in]
    matrix = weight.reshape(d_in, d_out).T if isinstance(layer.module, nn.Embedding) else weight.reshape(d_out, d_in)
    if layer.has_bias:
        matrix = torch.cat([matrix, gradient[d_out * d_in :].reshape(d_out, 1)], 1)
    if layer.out_projection is not None:
        matrix = layer.out_projection @ matrix
    if layer.in_projection is not None:
        matrix = matrix @ layer.in_projection.T
    return matrix.flatten()


def assert_blocks_equal_projected_gradients(featurizer: FactoredFeaturizer, features: torch.Tensor,
                                            exact: torch.Tensor) -> dict[str, slice]:
    """Every layer's and raw parameter's block equals :func:`reference_block` of the exact per-example gradients
    ``exact`` (columns in ``featurizer.parameter_names`` order) to 1e-10; returns each parameter's columns."""
    sizes = dict(featurizer.module.named_parameters())
    columns, start = {}, 0
    for name in featurizer.parameter_names:
        columns[name] = slice(start, start + sizes[name].numel())
        start += sizes[name].numel()
    slices = featurizer.layer_slices()
    for block in featurizer.layers + featurizer.raw:
        own = block.parameter_names if isinstance(block, FactoredLayer) else [block.name]
        gradient = torch.cat([exact[:, columns[name]] for name in own], 1)
        expected = torch.stack([reference_block(block, row) for row in gradient])
        assert expected.norm() > 0, block.name
        assert relative_error(features[:, slices[block.name]], expected) < 1e-10, block.name
    return columns


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def loop_gradients(output: ModelOutput, model: nn.Module, names: list[str], batch, indices) -> torch.Tensor:
    """Per-example gradients the slow way: one autograd.grad of the single-example output per example."""
    parameters = dict(model.named_parameters())
    rows = []
    for b in range(indices.shape[0]):
        example = map_batch(lambda t: t[b], batch)
        value = output.output(model, parameters, example, indices[b])
        grads = torch.autograd.grad(value, [parameters[name] for name in names], allow_unused=True)
        rows.append(torch.cat([torch.zeros_like(parameters[n]).flatten() if g is None else g.flatten()
                               for n, g in zip(names, grads)]))
    return torch.stack(rows)


@pytest.mark.parametrize(("case", "policy"), [(case, "factored") for case in CASES] + [
    ("hf_clip_quick_gelu", "exact")])
def test_every_layer_block_equals_the_projected_exact_per_example_gradient(case: str, policy: str) -> None:
    model, output, batch, others = CASES[case]()
    indices = torch.tensor([1, -1, 7, 4][: batch[0].shape[0]])
    featurizer = FactoredFeaturizer(model, output, proj_dim=None, layer_dim=3 if case.startswith("raw") else 6,
                                    other_parameters=policy)
    assert featurizer.other_names == others
    assert featurizer.parameter_names == [name for name, p in model.named_parameters() if p.requires_grad]
    names = featurizer.parameter_names
    with eager_attention(model):  # the same attention kernel on both sides (sdpa and eager differ by ~1e-9)
        features, weights = featurizer.features(batch, indices)
        exact = loop_gradients(output, model, names, batch, indices)
        expected_weights = output.loss_weight(model, batch, indices)
    assert features.dtype == torch.float64
    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)
    columns = assert_blocks_equal_projected_gradients(featurizer, features, exact)
    slices = featurizer.layer_slices()
    kinds = {(type(layer.module).__name__, layer.out_projection is None, layer.in_projection is None, layer.has_bias)
             for layer in featurizer.layers}
    assert [raw.name for raw in featurizer.raw] == (others if policy == "factored" else [])
    if policy == "exact":
        other = torch.cat([exact[:, :0]] + [exact[:, columns[name]] for name in others], 1)
        torch.testing.assert_close(features[:, slices["other"]], other, rtol=1e-10, atol=1e-12)
    else:
        assert slices["other"].start == slices["other"].stop == features.shape[1]
    if case.startswith("raw"):  # matrices with both sides projected, one side, none; vectors and a scalar
        sides = {(raw.row_projection is None, raw.column_projection is None) for raw in featurizer.raw
                 if raw.parameter.dim() == 2}
        assert sides == {(False, False), (False, True), (True, False)}
    if case == "layer_zoo":  # every layer type, projected and identity sides, with and without bias
        assert {kind[0] for kind in kinds} == {"Conv2d", "Embedding", "LayerNorm", "Linear"}
        assert {kind[1:] for kind in kinds if kind[0] != "LayerNorm"} >= {(True, False, True), (False, False, True),
                                                                          (True, False, False)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable >= set(names)  # the flags frozen during the pass are restored


def test_float32_blocks_agree_with_the_float64_reference_to_1e_5() -> None:
    model, output, batch, _ = hf_clip_case("quick_gelu")
    indices = torch.tensor([1, -1, 7])
    reference = FactoredFeaturizer(model, output, proj_dim=None).features(batch, indices)[0]
    model32 = model.float()
    output.bank = EmbeddingBank(output.bank.image_embeddings.float(), output.bank.text_embeddings.float(),
                                output.bank.indices)
    batch32 = (batch[0].float(), batch[1])
    features = FactoredFeaturizer(model32, output, proj_dim=None).features(batch32, indices)[0]
    assert features.dtype == torch.float32
    assert relative_error(features.double(), reference) < 1e-5


def test_sketched_features_are_the_count_sketch_of_the_layer_blocks() -> None:
    model, output, batch, _ = zoo_case()
    indices = torch.arange(4)
    blocks = FactoredFeaturizer(model, output, proj_dim=None, seed=5).features(batch, indices)[0]
    featurizer = FactoredFeaturizer(model, output, proj_dim=16, seed=5)
    features = featurizer.features(batch, indices)[0]
    sketch = featurizer.projector.matrix().double()
    torch.testing.assert_close(features, blocks @ sketch, rtol=1e-12, atol=1e-12)
    assert featurizer.settings()["projection"]["kind"] == "count_sketch"


def test_count_sketch_inner_products_are_unbiased() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 300, generator=generator, dtype=torch.float64)
    b = b + a  # correlated, so the expectation is far from zero
    estimates = torch.tensor([float(CountSketchProjector(300, 20, seed).project(torch.stack([a, b])).prod(0).sum())
                              for seed in range(2000)])
    # Var ≤ (‖a‖²‖b‖² + ⟨a,b⟩²)/k for a CountSketch with k buckets
    bound = ((a @ a) * (b @ b) + (a @ b) ** 2) / 20
    assert abs(float(estimates.mean() - a @ b)) < 5 * float(bound.sqrt()) / np.sqrt(2000)
    assert float(estimates.var()) < 1.2 * float(bound)


def test_other_parameter_policies() -> None:
    model, output, batch, others = hf_clip_case("quick_gelu")
    named = dict(model.named_parameters())
    share = 100 * sum(named[n].numel() for n in others) / sum(p.numel() for p in model.parameters())
    with pytest.warns(CliptraceWarning) as caught:
        excluded = FactoredFeaturizer(model, output, proj_dim=None, other_parameters="exclude")
    assert [str(w.message) for w in caught] == [  # once, naming exactly the excluded parameters and their share
        f"factored features leave out 2 parameters ({sum(named[n].numel() for n in others):,} of "
        f"{sum(p.numel() for p in model.parameters()):,} selected values, {share:.1f} %) because of "
        f"other_parameters='exclude': {', '.join(others)}"]
    assert excluded.other_names == others and not set(others) & set(excluded.parameter_names)
    assert excluded.layer_slices()["other"] == slice(excluded.input_dim, excluded.input_dim)
    covered = FactoredFeaturizer(model, output, proj_dim=None)  # the default forms their blocks from their uses
    assert [raw.name for raw in covered.raw] == others
    assert covered.parameter_names == list(named)
    with pytest.raises(ValueError, match="class_embedding.*other_parameters"):
        FactoredFeaturizer(model, output, other_parameters="error")
    with pytest.raises(ValueError, match="other_parameters must be one of"):
        FactoredFeaturizer(model, output, other_parameters="drop")
    only_linear = FactoredFeaturizer(model, output, parameters=["model.visual_projection.weight"],
                                     other_parameters="error")
    assert [layer.name for layer in only_linear.layers] == ["model.visual_projection"]


class HiddenWeightUse(nn.Module):
    """Uses one Linear's weight without calling the Linear: no hook can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.bypassed = nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        return self.used(x) + x @ self.bypassed.weight.T


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(images.shape[0], -1, 4)
        return self.head(self.attention(x, x, x)[0].mean(1))


class IndexedTable(nn.Module):
    """A raw table indexed by batched ids (no rule), or a raw parameter that the forward pass never uses."""

    def __init__(self, use: bool = True) -> None:
        super().__init__()
        self.use = use
        self.head = nn.Linear(4, 3)
        if use:
            self.token_table = nn.Parameter(torch.randn(5, 4))
        else:
            self.unused = nn.Parameter(torch.randn(2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        if self.use:
            x = x + self.token_table[(x[:, 0] > 0).long()]
        return self.head(x)


class RawOnly(nn.Module):
    """No supported layer at all: a projection matrix and a bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Parameter(torch.randn(4, 3))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(images.flatten(1) @ self.proj) + self.bias


class NoBatchForm(ModelOutput):
    def output(self, module, params, example, index):
        return module(example[None]).sum()

    def loss_weight(self, module, batch, indices):
        return torch.ones(batch.shape[0])


def test_unsupported_uses_are_refused_or_left_to_the_policy() -> None:
    images, labels = torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=r"\['bypassed'\].*did not run"):
        FactoredFeaturizer(HiddenWeightUse(), ImageClassificationMargin()).features((images, labels), torch.arange(3))
    attention = FactoredFeaturizer(WithAttention(), ImageClassificationMargin(), proj_dim=None)
    assert [layer.name for layer in attention.layers] == ["head"]
    assert [raw.name for raw in attention.raw] == ["attention.in_proj_weight", "attention.in_proj_bias",
                                                   "attention.out_proj.weight", "attention.out_proj.bias"]
    raw_only = RawOnly().double()
    batch = (images.double(), labels)
    features = FactoredFeaturizer(raw_only, ImageClassificationMargin(), proj_dim=None).features(batch,
                                                                                                 torch.arange(3))[0]
    exact = loop_gradients(ImageClassificationMargin(), raw_only, ["proj", "bias"], batch, torch.arange(3))
    torch.testing.assert_close(features, exact, rtol=1e-12, atol=1e-12)  # both sides narrower than layer_dim
    with pytest.raises(ValueError, match="none of the 2 selected parameters of RawOnly is in a layer"):
        FactoredFeaturizer(raw_only, ImageClassificationMargin(), other_parameters="exclude")
    for model, name in ((IndexedTable(), "token_table"), (IndexedTable(use=False), "unused")):
        model = model.double()
        featurizer = FactoredFeaturizer(model, ImageClassificationMargin(), proj_dim=None, layer_dim=2)
        batch = (images.double(), labels)
        with pytest.warns(CliptraceWarning, match=rf"exact per-example gradients .* 1 parameters .*: {name}$"):
            features = featurizer.features(batch, torch.arange(3))[0]
        raw = featurizer.raw[0]
        exact = loop_gradients(ImageClassificationMargin(), model, [name], batch, torch.arange(3))
        expected = torch.stack([reference_block(raw, row) for row in exact])
        torch.testing.assert_close(features[:, featurizer.layer_slices()[name]], expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="defines no batch_outputs"):
        FactoredFeaturizer(HiddenWeightUse(), NoBatchForm())
    assert isinstance(make_featurizer("auto", HiddenWeightUse(), NoBatchForm()), ExactFeaturizer)
    assert isinstance(make_featurizer("auto", HiddenWeightUse(), ImageClassificationMargin(), proj_dim=None),
                      ExactFeaturizer)
    assert isinstance(make_featurizer("auto", WithAttention(), ImageClassificationMargin()), FactoredFeaturizer)
    with pytest.raises(ValueError, match="features must be one of"):
        make_featurizer("fast", WithAttention(), ImageClassificationMargin())


class FlattensTheBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images.reshape(-1, 2)).reshape(images.shape[0], -1)


def test_a_layer_that_mixes_batch_and_tokens_is_refused_with_its_name() -> None:
    featurizer = FactoredFeaturizer(FlattensTheBatch(), ImageClassificationMargin())
    with pytest.raises(ValueError, match=r"'inner'.*leading dimension is not the batch size 3"):
        featurizer.features((torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2])), torch.arange(3))
    model, output, (images, labels), _ = raw_case(batch_first=False)  # a sequence-first TransformerEncoderLayer
    featurizer = FactoredFeaturizer(model, output, proj_dim=None)
    with pytest.raises(ValueError, match=r"'encoder.norm1' ran on a tensor of shape \(5, 2, 4\).*batch size 2"):
        featurizer.features((images[:2], labels[:2]), torch.arange(2))


def test_bf16_autocast_gives_float32_features_close_to_the_float32_ones() -> None:
    model, output, batch, _ = hf_clip_case("quick_gelu")
    model = model.float()
    output.bank = EmbeddingBank(output.bank.image_embeddings.float(), output.bank.text_embeddings.float(),
                                output.bank.indices)
    batch = (batch[0].float(), batch[1])
    indices = torch.tensor([1, -1, 7])
    reference = FactoredFeaturizer(model, output, proj_dim=64).features(batch, indices)[0]
    features = FactoredFeaturizer(model, output, proj_dim=64, autocast=torch.bfloat16).features(batch, indices)[0]
    assert features.dtype == torch.float32
    error = relative_error(features, reference)
    assert 0 < error < 5e-2  # bf16 keeps about 3 significant digits


def test_traker_takes_the_factored_path_wherever_it_applies(tmp_path) -> None:
    model = LayerZoo()

    def featurizer(**options):
        return TRAKer(model=model, task="image_classification", train_set_size=4, save_dir=tmp_path / str(options),
                      device="cpu", **options).featurizer

    assert isinstance(featurizer(proj_dim=16), FactoredFeaturizer)
    assert isinstance(featurizer(proj_dim=16, features="exact"), ExactFeaturizer)
    assert isinstance(featurizer(proj_dim=None), ExactFeaturizer)  # raw gradients: only the exact path has them
    with pytest.raises(ValueError, match="features must be one of"):
        featurizer(proj_dim=16, features="fast")


def test_whitening_leaves_raw_parameters_out_with_a_warning_naming_them() -> None:
    model, output, batch, others = hf_clip_case("quick_gelu")
    indices = torch.tensor([1, -1, 7])
    featurizer = FactoredFeaturizer(model, output, proj_dim=16)
    statistics = fit_statistics(featurizer, lambda: [(batch, indices)], "kfac")
    with pytest.warns(CliptraceWarning, match=rf"leave out 2 parameters .* the K-FAC whitening: {', '.join(others)}$"):
        featurizer.whiten(whitenings(statistics, 0.1), {"kind": "kfac", "damping": 0.1})
    assert featurizer.raw == [] and not set(others) & set(featurizer.parameter_names)
    assert featurizer.projector.input_dim == sum(layer.size for layer in featurizer.layers)
    assert featurizer.features(batch, indices)[0].shape == (3, 16)


class RecomputedAttention(TorchFunctionMode):
    """Replaces ``F.multi_head_attention_forward`` by :func:`multihead.multi_head_attention` with plain projections."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            call = multihead.bind(args, kwargs)
            assert multihead.supports(call)
            return multihead.multi_head_attention(F.linear, call)
        return func(*args, **kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_recomputed_attention_returns_what_torch_returns(batch_first: bool) -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
    with torch.no_grad():
        attention.in_proj_bias.normal_()
    query, other, keys = torch.randn(3, 3, 4, 8, dtype=torch.float64).unbind(0)
    keys = keys[:, :3]
    if not batch_first:
        query, other, keys = (t.transpose(0, 1) for t in (query, other, keys))
    padding = torch.tensor([[False, False, True, False], [False] * 4, [False, True, False, True]])
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    float_mask = torch.randn(2 * 3, 4, 3, dtype=torch.float64)
    calls = [
        ((query, query, query), {}),  # self-attention
        ((query, query, query), {"key_padding_mask": padding, "attn_mask": causal, "average_attn_weights": False}),
        ((query, query, query), {"attn_mask": causal.double() * -1e4, "is_causal": True, "need_weights": False}),
        ((query, query, query), {"key_padding_mask": padding.roll(1, 1), "attn_mask": causal,
                                 "need_weights": False}),  # a query that sees no key: zero, not NaN
        ((query, other, other), {"key_padding_mask": padding}),  # key is value
        ((query, keys, keys + 1), {"attn_mask": float_mask}),  # three inputs, another length
    ]
    for args, kwargs in calls:
        expected = attention(*args, **kwargs)
        with RecomputedAttention():
            output = attention(*args, **kwargs)
        torch.testing.assert_close(output[0], expected[0], rtol=1e-12, atol=1e-12)
        assert not output[0].isnan().any()
        if expected[1] is None:
            assert output[1] is None
        else:
            torch.testing.assert_close(output[1], expected[1], rtol=1e-12, atol=1e-12)
