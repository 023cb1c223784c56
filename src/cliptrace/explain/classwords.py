"""Per-word maps of a zero-shot class target: the class logit split over the words of its prompts.

A class c with templates T_1..T_K has the embedding ``c = m / ‖m‖`` with ``m = (1/K) Σ_k ψ_k`` and ψ_k the
normalized embedding of prompt k (as :func:`cliptrace.evaluate.class_embeddings` computes it). With ‖m‖ held at
its real value the class logit is linear in the prompt logits::

    τ ⟨φ, c⟩ = Σ_k w · τ ⟨φ, ψ_k⟩,   w = 1 / (K ‖m‖)

so a token attribution r_kt of prompt k's logit becomes a share ``w · r_kt`` of the class logit. The share of a
*word* sums its tokens' shares over every prompt:

* the class-name words (``"red"``, ``"circle"`` of ``"red circle"``), one entry per word of the name;
* each template word (whitespace-separated, cut at the class name: ``"{}."`` gives the class words and ``"."``),
  one entry per distinct string over all templates — a word missing from a template gets nothing from it, so
  its share is its mean contribution over the K templates, not over the templates that contain it;
* the special tokens (start and end of text), one entry each.

A token belongs to the word holding its first non-space character (a space-only token to the next word). For the
exact decomposition the shares, plus the constant source, sum to the class logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cliptrace.evaluate.templates import PLACEHOLDER, fill_template
from cliptrace.models.hf_clip import HFCLIP

Key = tuple[str, str]


@dataclass
class ClassPrompts:
    """The K prompts of one class, and which word each of their tokens belongs to.

    Attributes:
        name: The class name.
        words: The label of each of the W words: class-name words, template words, special tokens.
        tokens: The prompts' ``input_ids`` and ``attention_mask`` (K, L).
        assignment: (K, L, W) one-hot in the model's dtype: token t of prompt k belongs to word w (padding: none).
        weight: ``1 / (K ‖m‖)``, the weight of each prompt's logit in the class logit.
    """

    name: str
    words: list[str]
    tokens: dict[str, torch.Tensor]
    assignment: torch.Tensor
    weight: torch.Tensor

    def word_scores(self, token_scores: torch.Tensor) -> torch.Tensor:
        """The share of each word (W,) from per-token scores of the prompts' logits (K, L)."""
        return self.weight * torch.einsum("kl,klw->w", token_scores.to(self.assignment.dtype), self.assignment)


@torch.no_grad()
def class_prompts(model: HFCLIP, name: str, templates: Sequence[str], *, batch_size: int = 8) -> ClassPrompts:
    """The prompts of class ``name`` under ``templates``, their word assignment and weight (see the module)."""
    prompts = [fill_template(template, name) for template in templates]
    tokens = model.tokenize(prompts)
    # The text tower is causal: no real token attends to the padding after it, so the padding beyond the longest
    # prompt is cut (every embedding stays the same) and costs no work.
    length = int(tokens["attention_mask"].sum(1).max())
    tokens = {key: value[:, :length] for key, value in tokens.items()}
    try:
        encoded = model.tokenizer(prompts, padding="max_length", truncation=True, max_length=model.context_length,
                                  return_offsets_mapping=True, return_special_tokens_mask=True)
    except NotImplementedError as error:  # slow tokenizers have no character offsets
        raise TypeError(f"a per-word map of a class needs a fast tokenizer (character offsets): {error}") from None
    keys: dict[Key, str] = {("class", str(index)): word for index, word in enumerate(name.split())}
    per_prompt = []
    for template, prompt, ids, offsets, special in zip(templates, prompts, encoded["input_ids"],
                                                       encoded["offset_mapping"], encoded["special_tokens_mask"]):
        spans = _word_spans(template, name)
        assigned: list[Key | None] = []
        for token_id, (start, end), is_special in zip(ids, offsets, special):
            if token_id == model.tokenizer.pad_token_id and is_special:
                assigned.append(None)
            elif is_special:
                label = model.tokenizer.convert_ids_to_tokens(token_id)
                assigned.append(("special", label))
            else:
                assigned.append(_word_of(prompt, start, end, spans))
        per_prompt.append(assigned)
    for key in (key for assigned in per_prompt for key in assigned if key is not None and key[0] == "template"):
        keys.setdefault(key, key[1])
    for key in (key for assigned in per_prompt for key in assigned if key is not None and key[0] == "special"):
        keys.setdefault(key, key[1])
    order = {key: index for index, key in enumerate(keys)}
    dtype, device = model.logit_scale.dtype, model.logit_scale.device
    assignment = torch.zeros(len(prompts), tokens["input_ids"].shape[1], len(keys), dtype=dtype)
    for row, assigned in enumerate(per_prompt):
        for column, key in enumerate(assigned[:length]):
            if key is not None and tokens["attention_mask"][row, column]:
                assignment[row, column, order[key]] = 1
    tokens = {key: value.to(device) for key, value in tokens.items()}
    embeddings = torch.cat([model.encode_text(**{key: value[rows] for key, value in tokens.items()})
                            for rows in torch.arange(len(prompts)).split(batch_size)]).to(dtype)
    weight = 1 / (len(prompts) * embeddings.mean(0).norm())
    return ClassPrompts(name, list(keys.values()), tokens, assignment.to(device), weight)


def word_components(
    prompts: ClassPrompts,
    target: torch.Tensor,
    components: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    batch_size: int = 8,
) -> torch.Tensor:
    """Each word's component of the class embedding, (W + 1, E); the last row is the constant source.

    Args:
        prompts: The class's prompts.
        target: The class embedding (E,) that the components sum to; the constant source owns what the words
            do not (position embeddings, biases, and the rounding of ``target``).
        components: Per-token components (k, L + 1, E) of a batch of prompts' tokens, the constant source last.
        batch_size: Prompts decomposed at a time.
    """
    words = torch.zeros(len(prompts.words), target.shape[-1], dtype=prompts.assignment.dtype,
                        device=prompts.assignment.device)
    count = prompts.assignment.shape[0]
    for rows in torch.arange(count, device=words.device).split(batch_size):
        parts = components({key: value[rows] for key, value in prompts.tokens.items()})[:, :-1]
        words += torch.einsum("kle,klw->we", parts.to(words.dtype), prompts.assignment[rows])
    words *= prompts.weight
    constant = target.to(words.dtype) - words.sum(0)
    return torch.cat([words, constant[None]])


def _word_spans(template: str, name: str) -> list[tuple[int, int, Key]]:
    """The character span and key of every word of the prompt ``fill_template(template, name)``, in order."""
    spans: list[tuple[int, int, Key]] = []
    position = 0
    pieces = template.split(PLACEHOLDER)
    for index, piece in enumerate(pieces):
        spans += [(position + start, position + end, ("template", word)) for start, end, word in _words(piece)]
        position += len(piece)
        if index < len(pieces) - 1:
            spans += [(position + start, position + end, ("class", str(number)))
                      for number, (start, end, _) in enumerate(_words(name))]
            position += len(name)
    return spans


def _words(text: str) -> list[tuple[int, int, str]]:
    """The whitespace-separated words of ``text`` with their character spans."""
    words, start = [], None
    for index, character in enumerate(text + " "):
        if character.isspace():
            if start is not None:
                words.append((start, index, text[start:index]))
                start = None
        elif start is None:
            start = index
    return words


def _word_of(prompt: str, start: int, end: int, spans: list[tuple[int, int, Key]]) -> Key:
    """The key of the word holding the token's first non-space character (a space-only token: the next word)."""
    first = start
    while first < end and prompt[first].isspace():
        first += 1
    for _, span_end, key in spans:
        if span_end > first:
            return key
    return spans[-1][2]
