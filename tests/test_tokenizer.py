"""The offline byte-level BPE tokenizer: lossless on any script, BOS/EOS framing, padding, truncation, determinism."""

from __future__ import annotations

import pytest
import torch

from cliptrace.models.tokenizer import (
    MIN_VOCAB_SIZE,
    CaptionTruncatedWarning,
    tokenize,
    train_tokenizer,
)

ENGLISH = [
    "a red circle above a small blue square",
    "two green triangles left of a yellow star",
    "a large purple square below a tiny orange circle",
    "the blue circle is right of the red triangle",
]
UNSEEN = {
    "english": "A Red Circle, above (two) small squares!",
    "accented": "Crème brûlée à la façon de Jürgen Ørsted",
    "japanese": "赤い丸の上に小さな青い四角があります",
    "arabic": "دائرة حمراء فوق مربع أزرق صغير",
    "emoji": "a 🐱 riding a 🚀 past 🌍🌕 ✨",
}


@pytest.fixture(scope="module")
def tokenizer():
    """Trained on English only, case kept: other scripts are never seen in training."""
    return train_tokenizer(ENGLISH * 4, vocab_size=300, context_length=16, lowercase=False)


@pytest.mark.parametrize("text", UNSEEN.values(), ids=UNSEEN.keys())
def test_decode_inverts_encode_for_any_script(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("text", [UNSEEN["english"], UNSEEN["accented"]])
def test_lowercasing_tokenizer_decodes_to_lowercased_text(text: str) -> None:
    lowering = train_tokenizer(ENGLISH, vocab_size=300, lowercase=True)
    assert lowering.decode(lowering(text)["input_ids"], skip_special_tokens=True) == text.lower()


def test_special_ids_keep_eos_off_two_and_off_the_top(tokenizer) -> None:
    assert tokenizer.eos_token_id != 2
    assert tokenizer.eos_token_id < len(tokenizer) - 1
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


@pytest.mark.parametrize("text", [ENGLISH[0], "a 🐱", "a"])
def test_short_text_is_framed_by_bos_eos_and_padded(tokenizer, text: str) -> None:
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(body) + 2 <= 16
    expected = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    expected += [tokenizer.pad_token_id] * (16 - len(expected))
    mask = [1] * (len(body) + 2) + [0] * (16 - len(body) - 2)
    batch = tokenize(tokenizer, [text], context_length=16)
    assert batch["input_ids"].tolist() == [expected]
    assert batch["attention_mask"].tolist() == [mask]
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("context_length", [3, 8, 16])
def test_long_text_is_truncated_keeping_eos_last(tokenizer, context_length: int) -> None:
    text = " ".join(ENGLISH)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(body) > context_length
    expected = [tokenizer.bos_token_id, *body[: context_length - 2], tokenizer.eos_token_id]
    warning = rf"^1 of 2 caption\(s\) longer than the context length of {context_length} tokens were truncated"
    with pytest.warns(CaptionTruncatedWarning, match=warning):
        batch = tokenize(tokenizer, [text, "a"], context_length=context_length)
    assert batch["input_ids"].shape == (2, context_length)
    assert batch["input_ids"][0].tolist() == expected
    assert batch["attention_mask"][0].tolist() == [1] * context_length


def test_training_is_deterministic() -> None:
    first = train_tokenizer(ENGLISH * 3, vocab_size=320)
    second = train_tokenizer(ENGLISH * 3, vocab_size=320)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_vocabulary_grows_with_vocab_size_up_to_the_limit() -> None:
    small = train_tokenizer(ENGLISH, vocab_size=MIN_VOCAB_SIZE)
    larger = train_tokenizer(ENGLISH, vocab_size=MIN_VOCAB_SIZE + 20)
    assert len(small) == MIN_VOCAB_SIZE
    assert len(larger) == MIN_VOCAB_SIZE + 20


@pytest.mark.parametrize(
    "captions, kwargs, message",
    [
        ([], {}, "captions is empty"),
        (ENGLISH, {"vocab_size": MIN_VOCAB_SIZE - 1}, "vocab_size=258 is too small"),
        (["ok", 7], {}, r"captions\[1\] is int"),
        (ENGLISH, {"context_length": 2}, "context_length=2"),
    ],
)
def test_train_tokenizer_rejects_bad_arguments(captions, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_tokenizer(captions, **kwargs)


@pytest.mark.parametrize(
    "texts, message",
    [("one string", "not one string"), ([], "texts is empty"), (["fine", None], r"texts\[1\] is NoneType")],
)
def test_tokenize_rejects_bad_texts(tokenizer, texts, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tokenize(tokenizer, texts, context_length=16)
