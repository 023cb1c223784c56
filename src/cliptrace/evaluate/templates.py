"""Prompt templates and class-name lists for zero-shot classification, built in or read from text files."""

from __future__ import annotations

from pathlib import Path

PLACEHOLDER = "{}"

# The 80 ImageNet prompt templates of the CLIP paper (Radford et al., 2021), in their published order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7-template subset of IMAGENET_TEMPLATES that the CLIP authors selected as a small ensemble.
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def fill_template(template: str, classname: str) -> str:
    """The prompt for ``classname``: the template with its ``{}`` replaced (other braces are kept as text)."""
    return template.replace(PLACEHOLDER, classname)


def load_templates(path: str | Path) -> tuple[str, ...]:
    """Read prompt templates from a UTF-8 text file, one per line, each containing ``{}`` exactly once.

    Blank lines are skipped; surrounding whitespace is stripped.

    Raises:
        ValueError: naming the file and line of a template without exactly one ``{}``, or if there is none.
    """
    templates = []
    for number, line in _read_lines(path):
        if line.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"{path}, line {number}: a template must contain '{PLACEHOLDER}' exactly once, got {line!r}"
            )
        templates.append(line)
    if not templates:
        raise ValueError(f"{path}: no templates found")
    return tuple(templates)


def load_classnames(path: str | Path) -> tuple[str, ...]:
    """Read class names from a UTF-8 text file, one per line (blank lines skipped, whitespace stripped).

    Raises:
        ValueError: naming the file and line of a repeated class name, or if there is none.
    """
    first_line: dict[str, int] = {}
    for number, name in _read_lines(path):
        if name in first_line:
            raise ValueError(f"{path}, line {number}: class {name!r} repeats line {first_line[name]}")
        first_line[name] = number
    if not first_line:
        raise ValueError(f"{path}: no class names found")
    return tuple(first_line)


def _read_lines(path: str | Path) -> list[tuple[int, str]]:
    """The non-blank, stripped lines of a UTF-8 text file with their 1-based line numbers."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 ({error.reason})") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
