"""``cliptrace.explain`` on in-memory HuggingFace models: a ``CLIPModel`` or ``SiglipModel`` with its processor is
wrapped into the adapter, preprocesses as the processor's config says, and explains the logit the raw model
computes from the processor's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor, CLIPProcessor, SiglipConfig, SiglipImageProcessor, SiglipModel

from cliptrace import explain
from cliptrace.data.transforms import ImageTransform
from cliptrace.explain.wrap import as_dual_encoder
from cliptrace.models import HFCLIP, train_tokenizer
from cliptrace.models.siglip import SigLIPAdapter

CAPTIONS = ["a red circle", "a small blue square above a green cross"]


def images() -> list[Image.Image]:
    """Two 32×32 images: at the model's size, so both preprocessings only rescale and normalize."""
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)


@pytest.fixture(scope="module")
def clip(tokenizer):
    model = HFCLIP.from_preset("tiny", tokenizer, seed=0, image_size=32, vision_num_hidden_layers=1,
                               text_num_hidden_layers=1).model.eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


@pytest.fixture(scope="module")
def siglip(tokenizer):
    shared = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = SiglipConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, **shared),
                          vision_config=dict(image_size=32, patch_size=8, **shared))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SiglipModel(config).eval()
    return model, (tokenizer, SiglipImageProcessor(size={"height": 32, "width": 32}))


def raw_logits(model, image_processor, tokenizer) -> torch.Tensor:
    """``exp(logit_scale)·cos`` of each image with its caption, from the raw model on the processor's outputs."""
    pixels = image_processor(images(), return_tensors="pt")["pixel_values"]
    length = model.config.text_config.max_position_embeddings
    tokens = tokenizer(CAPTIONS, padding="max_length", max_length=length, return_tensors="pt")
    with torch.no_grad():
        phi = model.get_image_features(pixel_values=pixels).pooler_output
        if isinstance(model, SiglipModel):  # SigLIP's text tower attends to every position (no mask)
            psi = model.get_text_features(input_ids=tokens["input_ids"]).pooler_output
        else:
            psi = model.get_text_features(**tokens).pooler_output
    return model.logit_scale.exp() * (F.normalize(phi, dim=-1) * F.normalize(psi, dim=-1)).sum(-1)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_an_in_memory_model_and_its_processor_explain_the_raw_models_logit(family, request):
    model, processor = request.getfixturevalue(family)
    tokenizer, image_processor = processor if family == "siglip" else (processor.tokenizer, processor.image_processor)
    result = explain(model, images(), CAPTIONS, processor=processor)
    expected = raw_logits(model, image_processor, tokenizer)
    torch.testing.assert_close(result.logit, expected, atol=1e-5, rtol=1e-5)
    length = model.config.text_config.max_position_embeddings
    assert result.image_map.shape == (2, 4, 4) and result.text_map.shape == (2, length)
    torch.testing.assert_close(result.image_map.sum((1, 2)) + result.image_constant, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.text_map.sum(1) + result.text_constant, expected, atol=1e-5, rtol=1e-5)
    for name in ("chefer", "attention_rollout", "occlusion"):
        assert explain(model, images(), CAPTIONS, processor=processor, method=name).image_map.shape == (2, 4, 4)


def test_the_wrapper_takes_the_processors_tokenizer_and_preprocessing(clip, siglip):
    model, processor = clip
    wrapped = as_dual_encoder(model, processor)
    assert isinstance(wrapped, HFCLIP) and wrapped.model is model and wrapped.tokenizer is processor.tokenizer
    assert wrapped.preprocess == ImageTransform(32, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    model, processor = siglip
    wrapped = as_dual_encoder(model, processor)
    assert isinstance(wrapped, SigLIPAdapter) and wrapped.model is model
    assert wrapped.preprocess == ImageTransform(32, (0.5,) * 3, (0.5,) * 3)
    assert as_dual_encoder(wrapped) is wrapped


def test_what_cannot_be_wrapped_is_refused_clearly(clip):
    model, processor = clip
    pixels = torch.zeros(1, 3, 32, 32)
    with pytest.raises(TypeError, match="needs processor="):
        explain(model, pixels, "a red circle")
    with pytest.raises(TypeError, match="carries its own tokenizer"):
        explain(as_dual_encoder(model, processor), pixels, "a red circle", processor=processor)
    with pytest.raises(TypeError, match="got Linear"):
        explain(torch.nn.Linear(2, 2), pixels, "a red circle")
