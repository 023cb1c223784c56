"""The TRAK CLIP tutorial of ``traker`` runs on cliptrace with only the import changed (CPU; traker not needed).

The flow below is the tutorial's ("Applying TRAK to a custom task #2: CLIP"), line for line, with
``from cliptrace.trak import TRAKer`` instead of ``from trak import TRAKer``. It runs for a tiny open_clip-style
module (``forward(image, text) -> (image features, text features, scale)``) and for a HuggingFace ``CLIPModel``
left at its default (sdpa) attention. The scores are checked against what TRAK must give: copies of training pairs
are attributed to themselves, runs are reproducible, and the matrix saved under ``save_dir/scores`` is the one
returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPModel

from cliptrace.data.transforms import ImageTransform
from cliptrace.trak import TRAKer

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of EmbeddingBag

DEVICE = "cpu"
IMAGE_SIZE = 32
CONTEXT = 8
PAD, BOS, EOS = 0, 1, 3  # EOS is not 2: HF CLIP then pools the text at the EOS token (see DESIGN.md)
VOCAB = 100
WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "cross", "star",
         "small", "large", "above", "below", "left", "right", "of", "a", "two", "near", "far", "dark", "light"]
TRAIN_SET_SIZE = 32
VAL_SET_SIZE = 10
COPIED = 8  # the first COPIED targets are exact copies of training pairs 0, 3, 6, ...


# --- data: (PIL image, [caption]) pairs, a PIL -> tensor preprocess, a tokenizer -> LongTensor (N, L) ------------


def make_pairs(count: int, seed: int) -> list[tuple[Image.Image, list[str]]]:
    """Distinct random block images with random 3-5 word captions."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(np.kron(blocks, np.ones((10, 10, 1), dtype=np.uint8)))  # 40×40, resized to 32
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 6))))
        pairs.append((image, [caption]))
    return pairs


def tokenizer(texts: str | list[str]) -> torch.Tensor:
    """open_clip-style: a string or list of strings -> (N, CONTEXT) LongTensor framed by BOS/EOS, padded with 0."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = []
    for text in texts:
        body = [4 + WORDS.index(word) for word in text.split()][: CONTEXT - 2]
        ids = [BOS, *body, EOS]
        rows.append(ids + [PAD] * (CONTEXT - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


preprocess = ImageTransform(IMAGE_SIZE)


@pytest.fixture(scope="module")
def data() -> tuple[list, list]:
    ds_train = make_pairs(TRAIN_SET_SIZE, seed=0)
    copies = [ds_train[3 * i] for i in range(COPIED)]
    ds_val = copies + make_pairs(VAL_SET_SIZE - COPIED, seed=1)
    return ds_train, ds_val


# --- the two model kinds -----------------------------------------------------------------------------------


class TinyOpenCLIP(nn.Module):
    """open_clip-shaped: ``forward(image, text)`` -> normalized image features, normalized text features, scale."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.visual = nn.Linear(8 * (IMAGE_SIZE // 4) ** 2, dim)
        self.token_embedding = nn.EmbeddingBag(VOCAB, 24, mode="mean", padding_idx=PAD)
        self.text_projection = nn.Linear(24, dim)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(torch.tanh(self.conv(image)).flatten(1)), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.token_embedding(text)), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()


def open_clip_style() -> nn.Module:
    torch.manual_seed(0)
    return TinyOpenCLIP()


def hf_clip_model() -> nn.Module:
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)  # default attention implementation (sdpa): the TRAKer must cope
    assert model.config._attn_implementation == "sdpa"
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {"open_clip_style": open_clip_style, "hf_clip": hf_clip_model}


# --- the tutorial --------------------------------------------------------------------------------------------


def run_tutorial(model: nn.Module, ds_train: list, ds_val: list, save_dir: Path) -> np.ndarray:
    """The traker CLIP tutorial with ``from cliptrace.trak import TRAKer``; returns ``finalize_scores``."""
    loader_train, loader_val = ds_train, ds_val  # batch size 1, as in the tutorial
    traker = TRAKer(model=model, task="clip", proj_dim=512, train_set_size=TRAIN_SET_SIZE, save_dir=str(save_dir),
                    device=DEVICE, logging_level=logging.WARNING)
    traker.task.get_embeddings(model, ds_train, batch_size=1, size=600, embedding_dim=1024,
                               preprocess_fn_img=lambda x: preprocess(x).to(DEVICE).unsqueeze(0),
                               preprocess_fn_txt=lambda x: tokenizer(x[0]).to(DEVICE))
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for (img, captions) in loader_train:
        x = preprocess(img).to(DEVICE).unsqueeze(0)
        y = tokenizer(captions).to(DEVICE)
        traker.featurize(batch=(x, y), num_samples=x.shape[0])
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="clip_example", checkpoint=model.state_dict(), model_id=0,
                                    num_targets=VAL_SET_SIZE)
    for (img, captions) in loader_val:
        x = preprocess(img).to(DEVICE).unsqueeze(0)
        y = tokenizer(captions).to(DEVICE)
        traker.score(batch=(x, y), num_samples=x.shape[0])
    scores = traker.finalize_scores(exp_name="clip_example")
    return scores


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy CPU the threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(MODELS))
def tutorial(request, data, tmp_path_factory) -> dict:
    """Two independent runs of the tutorial on fresh (identically seeded) models of one kind."""
    ds_train, ds_val = data
    runs, models = [], []
    for attempt in range(2):
        save_dir = tmp_path_factory.mktemp(f"{request.param}-{attempt}") / "trak_results"
        models.append(MODELS[request.param]())
        runs.append((run_tutorial(models[-1], ds_train, ds_val, save_dir), save_dir))
    return {"kind": request.param, "runs": runs, "model": models[0]}


def test_scores_have_the_train_by_target_shape_and_are_finite(tutorial) -> None:
    scores, _ = tutorial["runs"][0]
    assert isinstance(scores, np.ndarray)
    assert scores.shape == (TRAIN_SET_SIZE, VAL_SET_SIZE)
    assert np.isfinite(scores).all()
    assert np.abs(scores).max() > 0


def test_copies_of_training_pairs_are_attributed_to_themselves(tutorial) -> None:
    scores, _ = tutorial["runs"][0]
    top = scores[:, :COPIED].argmax(axis=0)
    hits = int((top == 3 * np.arange(COPIED)).sum())
    # proj_dim 512 > 32 training pairs: traker's singular XᵀX would scramble this; cliptrace's n × n solve must
    # put each copy's own training pair on top.
    assert hits >= COPIED - 1, (f"{tutorial['kind']}: top-1 proponents {top.tolist()}, "
                                f"expected {(3 * np.arange(COPIED)).tolist()}")


def test_a_second_identical_run_gives_identical_scores(tutorial) -> None:
    (first, _), (second, _) = tutorial["runs"]
    np.testing.assert_array_equal(first, second)


def test_scores_are_saved_under_save_dir_and_equal_the_returned_array(tutorial) -> None:
    scores, save_dir = tutorial["runs"][0]
    saved = np.load(save_dir / "scores" / "clip_example.npy")
    np.testing.assert_array_equal(saved, scores)


def test_the_model_is_left_as_it_was(tutorial) -> None:
    """Same weights as a fresh model; HF attention back to sdpa (the TRAKer uses eager only while differentiating)."""
    model, fresh = tutorial["model"], MODELS[tutorial["kind"]]()
    for (name, value), (_, expected) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    configs = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert configs == ({"sdpa"} if tutorial["kind"] == "hf_clip" else set())


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("internal", ["gradient_computer", "saver", "score_computer"])
def test_traker_internals_are_refused_with_a_type_error(tmp_path, internal: str) -> None:
    with pytest.raises(TypeError, match=internal):
        TRAKer(model=open_clip_style(), task="clip", train_set_size=TRAIN_SET_SIZE, save_dir=str(tmp_path),
               device=DEVICE, proj_dim=16, **{internal: object()})


def test_featurize_before_load_checkpoint_is_a_clear_error(data, tmp_path) -> None:
    ds_train, _ = data
    model = open_clip_style()
    traker = TRAKer(model=model, task="clip", proj_dim=16, train_set_size=TRAIN_SET_SIZE, save_dir=str(tmp_path),
                    device=DEVICE)
    traker.task.get_embeddings(model, ds_train, batch_size=1, size=600, embedding_dim=1024,
                               preprocess_fn_img=lambda x: preprocess(x).unsqueeze(0),
                               preprocess_fn_txt=lambda x: tokenizer(x[0]))
    img, captions = ds_train[0]
    with pytest.raises(RuntimeError, match="load_checkpoint"):
        traker.featurize(batch=(preprocess(img).unsqueeze(0), tokenizer(captions)), num_samples=1)
