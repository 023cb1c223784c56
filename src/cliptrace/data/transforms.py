"""Image preprocessing with PIL and torch: resize, center crop, normalize."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``size`` (bicubic), center-crop ``size``×``size``, scale to [0, 1], normalize.

    Attributes:
        size: Output side length in pixels.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided after subtracting the mean.
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return a float32 tensor of shape (3, size, size)."""
        image = self.resize_crop(image.convert("RGB"))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std

    def resize_crop(
        self, image: Image.Image, resample: Image.Resampling = Image.Resampling.BICUBIC
    ) -> Image.Image:
        """The geometric step alone: resize the shorter side to ``size``, center-crop (``NEAREST`` for label maps)."""
        width, height = image.size
        scale = self.size / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def unnormalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map normalized pixels (..., 3, H, W) back to [0, 1] for display."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        return (pixels * std + mean).clamp(0, 1)

    def to_dict(self) -> dict:
        """A JSON-serializable description."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageTransform":
        """Inverse of :meth:`to_dict`."""
        return cls(size=int(data["size"]), mean=tuple(data["mean"]), std=tuple(data["std"]))
