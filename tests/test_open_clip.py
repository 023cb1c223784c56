"""The open_clip adapter with open_clip installed (``make test`` runs these in ``.venv-openclip``): tiny models built
from a config dict, saved and reloaded bit-exactly without open_clip's registry, and ``output_dict=True`` models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cliptrace.models import OpenCLIPAdapter, load_model
from cliptrace.models.open_clip import CONFIG_NAME
from cliptrace.trak.clip_call import clip_embed
from test_models import assert_same_weights, pixels

pytestmark = pytest.mark.open_clip

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CAPTIONS = ["a red circle", "a small blue square above a green cross", "two yellow triangles", "a purple cross"]


@pytest.fixture
def open_clip():
    return pytest.importorskip("open_clip", reason="open_clip is an optional extra: cliptrace[open_clip]")


def test_a_custom_config_round_trips_without_the_registry(open_clip, tmp_path) -> None:
    model = OpenCLIPAdapter.from_config(TINY, model_name="tiny-vit").eval()
    assert open_clip.get_model_config("tiny-vit") is None  # never registered: the directory must carry the config
    assert model.preprocess.size == 32
    tokens = model.tokenize(CAPTIONS)
    assert tokens["input_ids"].shape == (4, 16)
    images = pixels(model)
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(**tokens)
    torch.testing.assert_close(image.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(4))
    model.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())["model_cfg"] == TINY
    loaded = load_model(tmp_path / "saved").eval()
    assert isinstance(loaded, OpenCLIPAdapter) and loaded.model_name == "tiny-vit" and loaded.model_config == TINY
    assert_same_weights(model, loaded)
    assert loaded.preprocess == model.preprocess
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), image)
        assert torch.equal(loaded.encode_text(**tokens), text)
        assert torch.equal(loaded.tokenize(CAPTIONS)["input_ids"], tokens["input_ids"])


def test_a_registered_config_round_trips_and_the_registry_is_not_asked_again(open_clip, tmp_path) -> None:
    (tmp_path / "cliptrace-test-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "cliptrace-test-tiny.json")
    model = OpenCLIPAdapter.from_open_clip("cliptrace-test-tiny").eval()
    model.save(tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", tmp_path / "old")
    (tmp_path / "old" / CONFIG_NAME).unlink()  # as written before the config was saved: rebuilt by name
    assert_same_weights(model, load_model(tmp_path / "old"))
    open_clip.factory._MODEL_CONFIGS.pop("cliptrace-test-tiny")  # a fresh process: the name is unknown again
    loaded = load_model(tmp_path / "saved").eval()
    assert_same_weights(model, loaded)
    with pytest.raises(ValueError, match="no model config named 'cliptrace-test-tiny'.*from_config"):
        OpenCLIPAdapter.from_open_clip("cliptrace-test-tiny")


def test_a_directory_without_config_or_known_name_is_refused(open_clip, tmp_path) -> None:
    OpenCLIPAdapter.from_config(TINY, model_name="tiny-vit").save(tmp_path / "old")
    (tmp_path / "old" / CONFIG_NAME).unlink()  # as written before the config was saved
    with pytest.raises(ValueError, match=rf"old: no {CONFIG_NAME}, and open_clip has no model config named "
                                         r"'tiny-vit'"):
        load_model(tmp_path / "old")
    (tmp_path / "old" / CONFIG_NAME).write_text('{"model_cfg": {"embed_dim": 16}}')
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: expected"):
        load_model(tmp_path / "old")
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps({"model_cfg": TINY | {"embed_dim": 8}}))
    with pytest.raises(ValueError, match=r"model.safetensors: weights of another architecture than the open_clip "
                                         r"config of .*old \(.*size mismatch"):
        load_model(tmp_path / "old")
    with pytest.raises(ValueError, match="missing \\['vision_cfg', 'text_cfg'\\]"):
        OpenCLIPAdapter.from_config({"embed_dim": 16})


def test_output_dict_models_embed_save_and_call_like_tuple_models(open_clip, tmp_path) -> None:
    plain = OpenCLIPAdapter.from_config(TINY).eval()
    model = OpenCLIPAdapter.from_config(TINY, output_dict=True).eval()
    model.load_state_dict(plain.state_dict())
    assert model.model.output_dict and not plain.model.output_dict
    images, tokens = pixels(model), model.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        assert isinstance(model.model(images, tokens["input_ids"]), dict)
        assert torch.equal(model.encode_image(images), plain.encode_image(images))
        assert torch.equal(model.encode_text(**tokens), plain.encode_text(**tokens))
        # the raw open_clip module's forward, as the TRAK model outputs call it
        for got, expected in zip(clip_embed(model.model, {}, images, tokens["input_ids"]),
                                 clip_embed(plain.model, {}, images, tokens["input_ids"])):
            assert torch.equal(got, expected)
    model.save(tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    assert loaded.model.output_dict
    assert_same_weights(model, loaded)
