"""``cliptrace.explain(model, images, text, method=...)``: input attributions for image–text pairs in one call.

The target of an image is a caption (its text embedding ψ), or a zero-shot class (the mean of its normalized
prompt-template embeddings, renormalized, as in :func:`cliptrace.evaluate.class_embeddings`). A contrastive view
subtracts the mean embedding of a prompt set (or of the other classes) from the target, so the map shows what
makes the image match *this* caption rather than any caption: the explained number is then
``τ ⟨φ, v − mean_k v_k⟩``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel

from cliptrace.evaluate.templates import IMAGENET_TEMPLATES
from cliptrace.evaluate.zeroshot import class_embeddings
from cliptrace.explain.base import AttributionMethod, Explanation, missing_tower, patch_grid
from cliptrace.explain.classwords import ClassPrompts, class_prompts, word_components
from cliptrace.explain.decomposition import (
    ExactDecomposition,
    image_components,
    interaction,
    side_scores,
    text_components,
)
from cliptrace.explain.wrap import as_dual_encoder
from cliptrace.models.base import DualEncoder
from cliptrace.models.hf_clip import HFCLIP


class MethodFailed(RuntimeError):
    """An attribution method raised while computing its maps; the original exception is chained as the cause.

    Attributes:
        method: The method's name.
        problem: The original exception's type and the first line of its message.
    """

    def __init__(self, method: str, error: Exception) -> None:
        lines = str(error).strip().splitlines()
        self.method = method
        self.problem = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        super().__init__(f"method {method!r} failed: {self.problem}")


def method_names() -> list[str]:
    """Every method :func:`explain` accepts by name: the exact decomposition first, then the baselines."""
    from cliptrace.explain.baselines import BASELINES

    return [ExactDecomposition.name, *BASELINES]


def make_method(method: str | AttributionMethod) -> AttributionMethod:
    """An :class:`AttributionMethod` from its name (see :func:`method_names`), or the instance itself."""
    if isinstance(method, AttributionMethod):
        return method
    if method == ExactDecomposition.name:
        return ExactDecomposition()
    from cliptrace.explain.baselines import make_baseline

    return make_baseline(method)


def unavailable_methods(model: DualEncoder, methods: Sequence[str | AttributionMethod]) -> dict[str, str]:
    """The methods of ``methods`` that cannot run on ``model``, each with the reason (its image tower is missing)."""
    reason = missing_tower(model, "image")
    if reason is None:
        return {}
    chosen = [make_method(method) for method in methods]
    return {method.name: reason for method in chosen if method.needs_image_tower}


def explain(
    model: DualEncoder | PreTrainedModel,
    images: Image.Image | Sequence[Image.Image] | torch.Tensor,
    text: str | Sequence[str] | None = None,
    *,
    processor: Any = None,
    method: str | AttributionMethod = "decomposition",
    target_class: str | Sequence[str] | None = None,
    contrast: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    word_maps: bool = True,
    batch_size: int = 8,
) -> Explanation:
    """Explain why each image matches its caption (or zero-shot class).

    Args:
        model: Any DualEncoder, or an in-memory ``transformers.CLIPModel`` or ``SiglipModel`` with ``processor``
            (see :func:`~cliptrace.explain.wrap.as_dual_encoder`). The decomposition and the attention and
            embedding-space methods need a model that describes its towers (HFCLIP, OpenCLIPAdapter,
            SigLIPAdapter; see :func:`unavailable_methods`).
        images: PIL images, or preprocessed pixels (B, 3, H, W).
        text: The caption of each image (one string serves every image). Exclusive with ``target_class``.
        processor: With a transformers model: its processor (``CLIPProcessor``, ``SiglipProcessor``), or a
            ``(tokenizer, image_processor)`` pair.
        method: A name from :func:`method_names` or an :class:`AttributionMethod`.
        target_class: Explain the match with this zero-shot class instead (one name, or one per image).
        contrast: A prompt set whose mean embedding is subtracted from the target (captions only; for classes,
            ``classes`` does this).
        classes: With ``target_class``: contrast the class with the mean of the *other* classes of this list.
        templates: Prompt templates (with ``{}``) that make a class embedding; by default the 80 ImageNet
            templates ``cliptrace eval`` classifies with, so the explained logit is the one classified.
        word_maps: For class targets, also compute the per-word map (one text attribution per template).
        batch_size: Pairs (and, for class word maps, prompts) explained at a time.

    Returns:
        An :class:`Explanation`; ``text_map`` and ``tokens`` are set when the method has a text side and the
        model describes its text tower: per token for captions, and for an :class:`HFCLIP` per word of the
        prompts for classes (see :mod:`cliptrace.explain.classwords`); the constants and the interaction matrix
        for the decomposition.

    Raises:
        ValueError: Neither or both of ``text`` and ``target_class``, counts that do not match the images, or
            ``classes`` without ``target_class``.
        TypeError: ``model`` is neither a DualEncoder nor a supported transformers model with its processor.
        MethodFailed: The method raised while computing its maps (e.g. it needs a tower the model does not
            describe, or torch failed); the target and the arguments were fine, so other methods may still work.
    """
    model = as_dual_encoder(model, processor)
    attribution = make_method(method)
    pixels = _pixels(model, images)
    count = len(pixels)
    start = time.perf_counter()
    tokens, text_side, offset = resolve_target(model, count, text, target_class=target_class, contrast=contrast,
                                               classes=classes, templates=templates)
    target = text_side if offset is None else text_side - offset
    with torch.no_grad():
        image_side = model.encode_image(pixels)
        logit = model.logit_scale.exp() * (image_side * target).sum(-1)

    parts, words = [], None
    try:
        if word_maps and target_class is not None and isinstance(model, HFCLIP):  # HF CLIP's causal text tower
            words = _class_words(model, attribution, _per_image(target_class, count, "target_class"), text_side,
                                 templates, batch_size)
        width = 0 if words is None else max(len(prompts.words) for prompts, _ in words)
        for rows in torch.arange(count).split(batch_size):
            batch_tokens = None if tokens is None else {key: value[rows] for key, value in tokens.items()}
            batch_words = None if words is None else [words[row] for row in rows.tolist()]
            batch_offset = None if offset is None else offset.expand(count, -1)[rows]
            parts.append(_explain_batch(model, attribution, pixels[rows], target[rows], image_side[rows],
                                        batch_tokens, batch_words, batch_offset, width, batch_size))
    except Exception as error:  # whatever a method raises is that method's failure, named for the caller
        raise MethodFailed(attribution.name, error) from error
    strings = None
    if tokens is not None:
        strings = _token_strings(model, tokens)
    elif words is not None:
        strings = [list(prompts.words) for prompts, _ in words]
    result = Explanation(
        method=attribution.name,
        logit=logit,
        image_map=torch.cat([part["image_map"] for part in parts]),
        image_level=attribution.image_level,
        **{key: torch.cat([part[key] for part in parts]) for key in parts[0] if key != "image_map"},
        tokens=strings,
    )
    if result.text_map is None:
        result.tokens = None
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def resolve_target(
    model: DualEncoder,
    count: int,
    text: str | Sequence[str] | None = None,
    *,
    target_class: str | Sequence[str] | None = None,
    contrast: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor, torch.Tensor | None]:
    """The text side of ``count`` images, as :func:`explain` takes it.

    Returns:
        ``(tokens, side, offset)``: the captions' tokens (``None`` for classes), the target embeddings (count, D)
        in the model's dtype, and the contrast subtracted from them ((1 or count, D), or ``None``). The explained
        logit is ``τ ⟨φ, side − offset⟩``.
    """
    dtype = model.logit_scale.dtype
    if (text is None) == (target_class is None):
        raise ValueError("give either text (captions) or target_class (zero-shot classes), not both or neither")
    if classes is not None and target_class is None:
        raise ValueError("classes= contrasts a target class with the other classes; it needs target_class=")
    if target_class is not None and contrast is not None:
        raise ValueError("contrast= applies to captions; contrast a class with classes=[...] instead")
    if text is not None:
        tokens = model.tokenize(_per_image(text, count, "text"))
        side = model.encode_text(**tokens).to(dtype)
        return tokens, side, _mean_embedding(model, contrast, dtype) if contrast else None
    side, offset = _class_sides(model, _per_image(target_class, count, "target_class"), classes, templates, dtype)
    return None, side, offset


def _explain_batch(
    model: DualEncoder,
    attribution: AttributionMethod,
    pixels: torch.Tensor,
    target: torch.Tensor,
    image_side: torch.Tensor,
    tokens: dict[str, torch.Tensor] | None,
    words: list[tuple[ClassPrompts, torch.Tensor | None]] | None,
    offset: torch.Tensor | None,
    width: int,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """The maps of one batch; the decomposition also yields its constants and interaction matrix.

    ``words`` holds, for class targets, each pair's class prompts and (for the decomposition) word components;
    class word maps are padded with zeros to ``width`` words.
    """
    if isinstance(attribution, ExactDecomposition):
        with torch.no_grad():
            image = image_components(model, pixels, chunk_size=attribution.chunk_size)
            if tokens is None and words is None:  # a class target without its word map
                scores = side_scores(model, image, target)
                return {
                    "image_map": scores[:, :-1].reshape(len(pixels), *patch_grid(model, pixels)),
                    "image_constant": scores[:, -1],
                }
            if tokens is not None:
                text = text_components(model, **tokens, chunk_size=attribution.chunk_size)
            else:  # a class target: its word components, padded between the words and the constant source
                text = torch.stack([_padded_components(parts, width) for _, parts in words])
            if offset is not None:  # the prompt set's mean belongs to no token: it joins the constant source
                text[:, -1] -= offset.to(text.dtype)
            split = interaction(model, image, text)
            image_scores, text_scores = split.sum(2), split.sum(1)
            return {
                "image_map": image_scores[:, :-1].reshape(len(pixels), *patch_grid(model, pixels)),
                "image_constant": image_scores[:, -1],
                "text_map": text_scores[:, :-1],
                "text_constant": text_scores[:, -1],
                "interaction": split,
            }
    maps = {"image_map": attribution.attribute_image(model, pixels, target).detach()}
    if tokens is not None and missing_tower(model, "text") is None:  # token maps need the described text tower
        text_map = attribution.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], image_side)
        if text_map is not None:
            maps["text_map"] = text_map.detach()
    elif words is not None:
        scores = [_class_word_scores(model, attribution, prompts, side, batch_size)
                  for (prompts, _), side in zip(words, image_side)]
        if all(score is not None for score in scores):
            maps["text_map"] = torch.stack([_padded(score, width) for score in scores])
    return maps


def _class_words(
    model: HFCLIP,
    attribution: AttributionMethod,
    names: list[str],
    sides: torch.Tensor,
    templates: Sequence[str],
    batch_size: int,
) -> list[tuple[ClassPrompts, torch.Tensor | None]]:
    """Each pair's class prompts and, for the decomposition, the word components of its class embedding."""
    decomposition = attribution if isinstance(attribution, ExactDecomposition) else None
    by_name: dict[str, tuple[ClassPrompts, torch.Tensor | None]] = {}
    for name, side in zip(names, sides):
        if name in by_name:
            continue
        prompts = class_prompts(model, name, templates, batch_size=batch_size)
        parts = None
        if decomposition is not None:
            with torch.no_grad():
                parts = word_components(
                    prompts, side,
                    lambda batch: text_components(model, **batch, chunk_size=decomposition.chunk_size),
                    batch_size=batch_size,
                )
        by_name[name] = (prompts, parts)
    return [by_name[name] for name in names]


def _class_word_scores(
    model: HFCLIP, attribution: AttributionMethod, prompts: ClassPrompts, image_side: torch.Tensor, batch_size: int
) -> torch.Tensor | None:
    """One pair's word map from the method's text maps of its class prompts, or ``None`` if it has none."""
    maps = []
    for rows in torch.arange(prompts.assignment.shape[0]).split(batch_size):
        ids, mask = prompts.tokens["input_ids"][rows], prompts.tokens["attention_mask"][rows]
        text_map = attribution.attribute_text(model, ids, mask, image_side.expand(len(rows), -1))
        if text_map is None:
            return None
        maps.append(text_map.detach())
    return prompts.word_scores(torch.cat(maps))


def _padded(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Word scores (W,) padded with zeros to (width,)."""
    return torch.cat([scores, scores.new_zeros(width - len(scores))])


def _padded_components(parts: torch.Tensor, width: int) -> torch.Tensor:
    """Word components (W + 1, E) padded with zero rows before the constant source, to (width + 1, E)."""
    padding = parts.new_zeros(width + 1 - len(parts), parts.shape[-1])
    return torch.cat([parts[:-1], padding, parts[-1:]])


def _pixels(model: DualEncoder, images: Image.Image | Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """Preprocessed pixels (B, 3, H, W) in the model's dtype and device."""
    reference = model.logit_scale
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, torch.Tensor):
        if not images:
            raise ValueError("no images given")
        images = torch.stack([model.preprocess(image.convert("RGB")) for image in images])
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected preprocessed images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return images.to(device=reference.device, dtype=reference.dtype)


def _per_image(value: str | Sequence[str], count: int, name: str) -> list[str]:
    """One string per image: a single string serves them all."""
    values = [value] * count if isinstance(value, str) else list(value)
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} given for {count} images; give one, or one per image")
    return values


def _mean_embedding(model: DualEncoder, prompts: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
    """The mean normalized embedding (1, D) of a prompt set."""
    tokens = model.tokenize(list(prompts))
    return model.encode_text(**tokens).to(dtype).mean(0, keepdim=True)


def _class_sides(
    model: DualEncoder,
    names: list[str],
    classes: Sequence[str] | None,
    templates: Sequence[str],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each image's class embedding and, with ``classes``, the mean embedding of the other classes."""
    vocabulary = list(dict.fromkeys([*(classes or []), *names]))
    device = model.logit_scale.device
    embeddings = class_embeddings(model, vocabulary, templates, device=device).to(device=device, dtype=dtype)
    index = torch.tensor([vocabulary.index(name) for name in names], device=device)
    if classes is None:
        return embeddings[index], None
    listed = torch.tensor([vocabulary.index(name) for name in classes], device=device)
    if len(listed) < 2:
        raise ValueError("classes= needs at least two classes to contrast with")
    missing = [name for name in names if name not in classes]
    if missing:
        raise ValueError(f"target classes {missing} are not in classes=")
    others_sum = embeddings[listed].sum(0, keepdim=True) - embeddings[index]
    return embeddings[index], others_sum / (len(listed) - 1)


def _token_strings(model: DualEncoder, tokens: dict[str, torch.Tensor]) -> list[list[str]]:
    """The readable text of each kept token, per caption."""
    tokenizer = model.tokenizer
    return [
        [tokenizer.decode([token]) for token in ids[mask.bool()].tolist()]
        for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"])
    ]
