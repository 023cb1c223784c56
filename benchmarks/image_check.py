"""The up-front image check of ``--on-bad-sample fail`` vs a full decode (what ``skip`` does), on the same files.

Usage::

    python benchmarks/image_check.py [--shapes 1600] [--jpeg 200 --jpeg-size 640x480] [--repeats 3]

Writes a shapes world (64×64 PNGs) and a folder of photo-sized JPEGs (smooth noise, quality 90) into a temporary
folder, then times :meth:`cliptrace.data.images.ImageLoader.verify` and :meth:`ImageLoader.load` over every file,
alternating the two, and prints the best of ``--repeats`` runs of each with the ratio. Files are read once before
timing, so both read from the page cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cliptrace.data.images import ImageLoader
from cliptrace.data.shapes import generate_shapes_world


def _best_seconds(check: Callable[[str], object], paths: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            check(path)
        best = min(best, time.perf_counter() - started)
    return best


def _jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=1600, help="images of the shapes world")
    parser.add_argument("--jpeg", type=int, default=200, help="photo-sized JPEGs")
    parser.add_argument("--jpeg-size", default="640x480", help="their size, WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best is reported")
    args = parser.parse_args()
    size = tuple(int(side) for side in args.jpeg_size.split("x"))
    loader = ImageLoader()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        generate_shapes_world(root / "world", n_images=args.shapes, seed=0)
        sets = {f"shapes world, {args.shapes} PNG 64×64": sorted(str(p) for p in (root / "world").rglob("*.png")
                                                                  if "masks" not in p.parts),
                f"{args.jpeg} JPEG {args.jpeg_size}": _jpegs(root / "jpeg", args.jpeg, size)}
        print("| images | check (fail) | full decode (skip) | decode / check |")
        print("|---|---|---|---|")
        for name, paths in sets.items():
            for path in paths:
                Path(path).read_bytes()
            check = _best_seconds(loader.verify, paths, args.repeats)
            decode = _best_seconds(loader.load, paths, args.repeats)
            print(f"| {name} | {check:.3f} s ({check / len(paths) * 1e3:.2f} ms each) | {decode:.3f} s "
                  f"({decode / len(paths) * 1e3:.2f} ms each) | {decode / check:.1f}× |")


if __name__ == "__main__":
    main()
