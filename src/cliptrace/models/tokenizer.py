"""Train a byte-level BPE tokenizer offline from captions, load a model directory's tokenizer, and tokenize text
to fixed-length tensors."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
# Ids 0, 1, 2 in this order: the EOS id is 1, never 2 (HF CLIP pools at argmax(input_ids) when eos_token_id == 2)
# and never the highest id, so pooling at EOS and pooling at the highest id are told apart.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN)
MIN_VOCAB_SIZE = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
QUOTED_PREFIX = 60  # characters of the first truncated caption quoted in the warning
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json")
VOCABULARY_FILES = "tokenizer.json, or vocab.json and merges.txt, or vocab.txt, or a SentencePiece *.model"
VOCABULARY_PATTERNS = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "*.model")


class CaptionTruncatedWarning(UserWarning):
    """Texts longer than the context length were truncated to fit it."""


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 1024,
    context_length: int = 32,
    lowercase: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``captions``; it encodes any UTF-8 text without unknown tokens.

    Every encoding is ``<|startoftext|> ... <|endoftext|>``; truncation to ``context_length`` keeps the EOS
    token last and padding uses ``<|pad|>`` (id 0). Ids: pad 0, EOS 1, BOS 2. Text is NFC-normalized and,
    when ``lowercase``, lower-cased. Training is deterministic.

    Args:
        captions: Training texts.
        vocab_size: Largest vocabulary size (256 byte tokens, 3 special tokens, then merges); a small corpus
            may stop short of it.
        context_length: Default maximum length of an encoding, BOS and EOS included.
        lowercase: Lower-case text before encoding.

    Raises:
        ValueError: ``captions`` is empty or holds a non-string, ``vocab_size`` is below 259, or
            ``context_length`` is below 3.
    """
    texts = _string_list(captions, "captions", "a tokenizer needs at least one caption to train on")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if context_length < 3:
        raise ValueError(f"context_length={context_length} is too small: it must hold BOS, one token and EOS")

    backend = Tokenizer(models.BPE())
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id, eos_id = backend.token_to_id(BOS_TOKEN), backend.token_to_id(EOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=context_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(directory: str | Path, vocab_size: int | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory, never downloading.

    Without tokenizer files transformers builds a tokenizer from ``config.json`` alone that knows only its special
    tokens, so every text encodes to the same ids: such a directory is refused.

    Args:
        directory: The directory holding the tokenizer files.
        vocab_size: Rows of the text tower's token embedding; a tokenizer with larger ids is refused.

    Raises:
        ValueError: A tokenizer JSON file is not valid JSON (naming it), the files do not load, there are none
            (the tokenizer would hold special tokens only), or the tokenizer's ids outgrow ``vocab_size``.
    """
    directory = Path(directory)
    for name in TOKENIZER_JSON_FILES:
        _require_json(directory / name)
    backend = directory / "tokenizer.json"
    if backend.is_file():
        try:
            Tokenizer.from_file(str(backend))
        except Exception as error:  # tokenizers raises a bare Exception for a file it cannot read
            raise ValueError(f"{backend}: not a tokenizer file ({error})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # tokenizers and transformers raise bare Exception, KeyError, ... on damaged files
        raise ValueError(f"{directory}: its tokenizer files do not load ({type(error).__name__}: {error})") from error
    vocabulary = tokenizer.get_vocab()
    if not set(vocabulary.values()) - set(tokenizer.all_special_ids):
        present = sorted(path.name for pattern in VOCABULARY_PATTERNS for path in directory.glob(pattern))
        problem = (f"its tokenizer files ({', '.join(present)}) hold" if present else
                   f"no tokenizer files ({VOCABULARY_FILES}): a tokenizer built from config.json alone knows")
        raise ValueError(f"{directory}: {problem} only {len(vocabulary)} special tokens, so every text would encode to "
                         f"the same ids; save the model's tokenizer there (tokenizer.save_pretrained)")
    largest = max(vocabulary.values())
    if vocab_size is not None and largest >= vocab_size:
        raise ValueError(
            f"{directory}: the tokenizer has token id {largest}, but the text tower embeds only {vocab_size} ids "
            f"(0..{vocab_size - 1}): the tokenizer belongs to another model"
        )
    return tokenizer


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], context_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` to ``{"input_ids", "attention_mask"}`` long tensors of shape (B, context_length).

    Texts are padded to ``context_length`` and longer ones truncated, keeping the tokenizer's EOS token last. When
    any text is truncated, one :class:`CaptionTruncatedWarning` per call says how many and quotes the first.

    Raises:
        ValueError: ``texts`` is a bare string or empty, or an item is not a string.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not one string")
    texts = _string_list(texts, "texts")
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=context_length,
        return_attention_mask=True,
        return_tensors="pt",
    )
    full = encoded["attention_mask"].sum(dim=1) == context_length
    if full.any():  # only a text that fills the context can have been cut
        _warn_if_truncated(tokenizer, [text for text, filled in zip(texts, full.tolist()) if filled], len(texts),
                           context_length)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _warn_if_truncated(tokenizer: PreTrainedTokenizerBase, candidates: list[str], total: int,
                       context_length: int) -> None:
    """Warn once when encodings of ``candidates`` (special tokens included; ``total`` texts in the call) are longer
    than ``context_length``."""
    lengths = [len(ids) for ids in tokenizer(candidates, truncation=False, verbose=False)["input_ids"]]
    cut = [text for text, length in zip(candidates, lengths) if length > context_length]
    if cut:
        first = cut[0] if len(cut[0]) <= QUOTED_PREFIX else cut[0][:QUOTED_PREFIX] + "..."
        warnings.warn(
            f"{len(cut)} of {total} caption(s) longer than the context length of {context_length} tokens "
            f"were truncated to fit it; the first: {first!r}",
            CaptionTruncatedWarning,
            stacklevel=3,
        )


def _require_json(path: Path) -> None:
    """Refuse a file that exists but is not valid JSON, naming it (transformers' own error names no file)."""
    if not path.is_file():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}): {error.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _string_list(items: Iterable[str], name: str, why: str = "") -> list[str]:
    """``items`` as a non-empty list of strings; the error names the argument and the offending index."""
    texts = list(items)
    if not texts:
        raise ValueError(f"{name} is empty" + (f": {why}" if why else ""))
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{index}] is {type(text).__name__}, not str")
    return texts
