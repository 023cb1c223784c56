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

import torch
from PIL import Image

from cliptrace.evaluate.zeroshot import class_embeddings
from cliptrace.explain.base import AttributionMethod, Explanation, patch_grid, require_hf_clip
from cliptrace.explain.decomposition import (
    ExactDecomposition,
    image_components,
    interaction,
    side_scores,
    text_components,
)
from cliptrace.models.base import DualEncoder
from cliptrace.models.hf_clip import HFCLIP

DEFAULT_TEMPLATES: tuple[str, ...] = ("a {}", "a photo of a {}.")


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


def explain(
    model: DualEncoder,
    images: Image.Image | Sequence[Image.Image] | torch.Tensor,
    text: str | Sequence[str] | None = None,
    *,
    method: str | AttributionMethod = "decomposition",
    target_class: str | Sequence[str] | None = None,
    contrast: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 8,
) -> Explanation:
    """Explain why each image matches its caption (or zero-shot class).

    Args:
        model: Any DualEncoder; the decomposition and the attention/patch methods need an :class:`HFCLIP`.
        images: PIL images, or preprocessed pixels (B, 3, H, W).
        text: The caption of each image (one string serves every image). Exclusive with ``target_class``.
        method: A name from :func:`method_names` or an :class:`AttributionMethod`.
        target_class: Explain the match with this zero-shot class instead (one name, or one per image).
        contrast: A prompt set whose mean embedding is subtracted from the target (captions only; for classes,
            ``classes`` does this).
        classes: With ``target_class``: contrast the class with the mean of the *other* classes of this list.
        templates: Prompt templates (with ``{}``) that make a class embedding.
        batch_size: Pairs explained at a time.

    Returns:
        An :class:`Explanation`; ``text_map`` and ``tokens`` are set for caption targets when the method has a
        text side and the model is an :class:`HFCLIP`, the constants and the interaction matrix for the
        decomposition.

    Raises:
        ValueError: Neither or both of ``text`` and ``target_class``, counts that do not match the images, or
            ``classes`` without ``target_class``.
        MethodFailed: The method raised while computing its maps (e.g. it needs an :class:`HFCLIP`, or torch
            failed); the target and the arguments were fine, so other methods may still work.
    """
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

    parts = []
    try:
        for rows in torch.arange(count).split(batch_size):
            batch_tokens = None if tokens is None else {key: value[rows] for key, value in tokens.items()}
            batch_offset = None if offset is None else offset.expand(count, -1)[rows]
            parts.append(_explain_batch(model, attribution, pixels[rows], target[rows], image_side[rows],
                                        batch_tokens, batch_offset))
    except Exception as error:  # whatever a method raises is that method's failure, named for the caller
        raise MethodFailed(attribution.name, error) from error
    result = Explanation(
        method=attribution.name,
        logit=logit,
        image_map=torch.cat([part["image_map"] for part in parts]),
        image_level=attribution.image_level,
        **{key: torch.cat([part[key] for part in parts]) for key in parts[0] if key != "image_map"},
        tokens=None if tokens is None else _token_strings(model, tokens),
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
    templates: Sequence[str] = DEFAULT_TEMPLATES,
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
    offset: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The maps of one batch; the decomposition also yields its constants and interaction matrix."""
    if isinstance(attribution, ExactDecomposition):
        require_hf_clip(model, "the exact decomposition")
        with torch.no_grad():
            image = image_components(model, pixels, chunk_size=attribution.chunk_size)
            if tokens is None:
                scores = side_scores(model, image, target)
                return {
                    "image_map": scores[:, :-1].reshape(len(pixels), *patch_grid(model, pixels)),
                    "image_constant": scores[:, -1],
                }
            text = text_components(model, **tokens, chunk_size=attribution.chunk_size)
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
    if tokens is not None and isinstance(model, HFCLIP):  # token-embedding maps need HF CLIP's text tower
        text_map = attribution.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], image_side)
        if text_map is not None:
            maps["text_map"] = text_map.detach()
    return maps


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
