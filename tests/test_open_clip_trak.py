"""Factored TRAK features of open_clip models against exact per-example gradients (float64), and the coverage of
ViT-B-32 (built from its config, no weights): every trainable parameter, or one warning naming what is left out."""

from __future__ import annotations

import warnings

import pytest
import torch

from cliptrace.models import OpenCLIPAdapter
from cliptrace.notices import CliptraceWarning
from cliptrace.trak.factored import FactoredFeaturizer
from cliptrace.trak.outputs import ClipMargin, EmbeddingBank
from test_open_clip import CAPTIONS, TINY
from test_trak_factored import assert_blocks_equal_projected_gradients, loop_gradients

pytestmark = pytest.mark.open_clip

# open_clip's CLIP keeps these as raw parameters (in ``named_parameters`` order), and four inside the
# nn.MultiheadAttention of every residual block
RAW_NAMES = ["positional_embedding", "text_projection", "logit_scale", "visual.class_embedding",
             "visual.positional_embedding", "visual.proj"]
ATTENTION_NAMES = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]


def raw_names(layers: int) -> list[str]:
    """The parameters of an open_clip CLIP with ``layers`` blocks per tower outside hooked layers, in order."""
    return RAW_NAMES + [f"{tower}resblocks.{i}.{name}" for tower in ("visual.transformer.", "transformer.")
                        for i in range(layers) for name in ATTENTION_NAMES]


@pytest.fixture
def open_clip():
    return pytest.importorskip("open_clip", reason="open_clip is an optional extra: cliptrace[open_clip]")


@pytest.mark.parametrize("output_dict", [False, True])
def test_factored_blocks_of_every_open_clip_parameter_equal_projected_exact_gradients(open_clip,
                                                                                     output_dict: bool) -> None:
    adapter = OpenCLIPAdapter.from_config(TINY, output_dict=output_dict)
    model = adapter.model.double().eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-trivial biases, LayerNorms and embeddings
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    images = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    texts = adapter.tokenize(CAPTIONS[:3])["input_ids"]
    output = ClipMargin()
    bank = torch.nn.functional.normalize(torch.randn(2, 5, 16, generator=generator, dtype=torch.float64), dim=-1)
    output.bank = EmbeddingBank(bank[0], bank[1], torch.tensor([0, 1, 5, 7, 8]))
    indices = torch.tensor([1, -1, 7])

    featurizer = FactoredFeaturizer(model, output, proj_dim=None, layer_dim=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CliptraceWarning)  # no exact fallback: every use has a rule
        features, _ = featurizer.features((images, texts), indices)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert featurizer.parameter_names == names
    assert [raw.name for raw in featurizer.raw] == raw_names(1)
    exact = loop_gradients(output, model, names, (images, texts), indices)
    assert_blocks_equal_projected_gradients(featurizer, features, exact)
    projected = {raw.name for raw in featurizer.raw if raw.row_projection is not None}
    assert {"visual.proj", "text_projection", "visual.transformer.resblocks.0.attn.in_proj_weight"} <= projected


def test_vit_b_32_is_covered_entirely_by_default_and_exclusion_names_each_parameter(open_clip) -> None:
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    expected_raw = raw_names(12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CliptraceWarning)
        featurizer = FactoredFeaturizer(model, ClipMargin())
    assert featurizer.parameter_names == names
    covered = [n for layer in featurizer.layers for n in layer.parameter_names] + [raw.name for raw in featurizer.raw]
    assert sorted(covered) == sorted(names)
    assert [raw.name for raw in featurizer.raw] == expected_raw

    sizes = dict(model.named_parameters())
    left_out = sum(sizes[name].numel() for name in expected_raw)
    total = sum(sizes[name].numel() for name in names)
    with pytest.warns(CliptraceWarning) as caught:
        FactoredFeaturizer(model, ClipMargin(), other_parameters="exclude")
    assert [str(w.message) for w in caught] == [
        f"factored features leave out {len(expected_raw)} parameters ({left_out:,} of {total:,} selected values, "
        f"{100 * left_out / total:.1f} %) because of other_parameters='exclude': {', '.join(expected_raw)}"]
    assert f"{100 * left_out / total:.1f}" == "27.6"  # the share the report measured
