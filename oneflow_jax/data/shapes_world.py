"""shapes-world v1: the built-in procedurally generated interleaved text-image corpus.

Implements /work/shared/specs/shapes-world.md exactly: 32x32 RGB renders of two flat-coloured objects (one per
half), the caption grammar, the three document kinds, the held-out rule and an attribute judge for scoring generated
images. Everything is numpy and deterministic from (seed, split, index); no other module special-cases this data.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 32
HALF = IMAGE_SIZE // 2
IMAGE_TOKEN = "<image>"
BACKGROUND = (255, 255, 255)

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
}
KINDS = ("generation", "understanding", "interleaved")
NUM_OBJECTS = len(COLORS) * len(SHAPES)  # 12

# Size ranges (inclusive) from the spec: (width choices, height choices) of the object's bounding box.
CIRCLE_DIAMETERS = (10, 11, 12)
SQUARE_SIDES = (10, 11, 12)
TRIANGLE_BASES = (11, 12)
TRIANGLE_HEIGHTS = (10, 11, 12)

_SPLIT_CODES = {"train": 0, "eval": 1}


class ObjectSpec(NamedTuple):
    color: str
    shape: str


class ImageSpec(NamedTuple):
    left: ObjectSpec
    right: ObjectSpec

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        """(left_color, left_shape, right_color, right_shape): the order `judge_image` and `parse_caption` use."""
        return (self.left.color, self.left.shape, self.right.color, self.right.shape)


def label_indices(spec: ImageSpec) -> tuple[int, int, int, int]:
    """(left_color, left_shape, right_color, right_shape) as indices into COLORS / SHAPES (the record labels)."""
    return (COLORS.index(spec.left.color), SHAPES.index(spec.left.shape),
            COLORS.index(spec.right.color), SHAPES.index(spec.right.shape))


def labels_to_attributes(labels) -> tuple[str, str, str, str]:
    lc, ls, rc, rs = (int(v) for v in labels)
    return (COLORS[lc], SHAPES[ls], COLORS[rc], SHAPES[rs])


# ------------------------------------------------------------------------------------------------ held-out rule

def object_index(obj: ObjectSpec) -> int:
    """o = 3 * color_index + shape_index, in 0..11."""
    return 3 * COLORS.index(obj.color) + SHAPES.index(obj.shape)


def object_from_index(o: int) -> ObjectSpec:
    if not 0 <= o < NUM_OBJECTS:
        raise ValueError(f"object index must be in [0, {NUM_OBJECTS}), got {o}")
    return ObjectSpec(COLORS[o // 3], SHAPES[o % 3])


def is_held_out(spec: ImageSpec) -> bool:
    """An image (left o_l, right o_r) is held out iff (12 * o_l + o_r) % 17 == 0."""
    return (12 * object_index(spec.left) + object_index(spec.right)) % 17 == 0


@functools.lru_cache(maxsize=None)
def _pairs(held_out: bool) -> tuple[ImageSpec, ...]:
    pairs = []
    for o_l in range(NUM_OBJECTS):
        for o_r in range(NUM_OBJECTS):
            spec = ImageSpec(object_from_index(o_l), object_from_index(o_r))
            if is_held_out(spec) == held_out:
                pairs.append(spec)
    return tuple(pairs)


def held_out_pairs() -> tuple[ImageSpec, ...]:
    return _pairs(True)


def seen_pairs() -> tuple[ImageSpec, ...]:
    return _pairs(False)


# ---------------------------------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] mask of a shape filling its bounding box (pixel centres at +0.5)."""
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = xs + 0.5, ys + 0.5
    if shape == "square":
        if width != height:
            raise ValueError("a square needs width == height")
        mask = np.ones((height, width), bool)
    elif shape == "circle":
        if width != height:
            raise ValueError("a circle needs width == height")
        r = width / 2.0
        mask = (cx - r) ** 2 + (cy - r) ** 2 <= r ** 2
    elif shape == "triangle":
        # Isosceles, apex up: row r spans |x - w/2| <= (w/2) * (r + 1) / h, so the bottom row is the full base and
        # the top row holds the apex pixel(s); the bounding box is exactly width x height.
        mask = np.abs(cx - width / 2.0) <= (width / 2.0) * (ys + 1) / height
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return mask


def _sample_size(shape: str, rng: np.random.Generator) -> tuple[int, int]:
    if shape == "circle":
        d = CIRCLE_DIAMETERS[int(rng.integers(len(CIRCLE_DIAMETERS)))]
        return d, d
    if shape == "square":
        s = SQUARE_SIDES[int(rng.integers(len(SQUARE_SIDES)))]
        return s, s
    return (TRIANGLE_BASES[int(rng.integers(len(TRIANGLE_BASES)))],
            TRIANGLE_HEIGHTS[int(rng.integers(len(TRIANGLE_HEIGHTS)))])


def render(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Renders one 32x32x3 uint8 image: white background, two flat objects, sizes/positions jittered uniformly."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, np.uint8)
    for half, obj in enumerate((spec.left, spec.right)):
        w, h = _sample_size(obj.shape, rng)
        # >= 1 px margin to the half's borders and the image border: x0 in [x_lo + 1, x_lo + 16 - 1 - w].
        x_lo = half * HALF
        x0 = int(rng.integers(x_lo + 1, x_lo + HALF - 1 - w, endpoint=True))
        y0 = int(rng.integers(1, IMAGE_SIZE - 1 - h, endpoint=True))
        region = img[y0:y0 + h, x0:x0 + w]
        region[shape_mask(obj.shape, w, h)] = RGB[obj.color]
    return img


# ------------------------------------------------------------------------------------------------------ captions

def caption(spec: ImageSpec) -> str:
    return (f"a {spec.left.color} {spec.left.shape} on the left and "
            f"a {spec.right.color} {spec.right.shape} on the right")


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_CAPTION_RE = re.compile(
    rf"a ({_COLOR_RE}) ({_SHAPE_RE}) on the left and a ({_COLOR_RE}) ({_SHAPE_RE}) on the right")


def parse_caption(text: str) -> tuple[str, str, str, str] | None:
    """(left_color, left_shape, right_color, right_shape) if `text` is exactly one caption of the grammar, else None."""
    m = _CAPTION_RE.fullmatch(text)
    return None if m is None else (m.group(1), m.group(2), m.group(3), m.group(4))


def make_document(kind: str, specs: list[ImageSpec]) -> str:
    """The document text for `kind` with one `<image>` marker per spec."""
    if kind == "generation":
        (spec,) = specs
        return f"{caption(spec)} {IMAGE_TOKEN}"
    if kind == "understanding":
        (spec,) = specs
        return f"{IMAGE_TOKEN} {caption(spec)}"
    if kind == "interleaved":
        if len(specs) not in (2, 3):
            raise ValueError(f"interleaved documents have 2 or 3 pairs, got {len(specs)}")
        return " then ".join(f"{caption(s)} {IMAGE_TOKEN}" for s in specs)
    raise ValueError(f"unknown document kind {kind!r}; known: {KINDS}")


def document_pairs(text: str) -> list[tuple[str | None, int | None]]:
    """Splits a (generated) document into its (caption text, image index) pairs.

    Chunks are separated by ` then `; a chunk is `{caption} <image>` or `<image> {caption}`. Image indices count the
    `<image>` markers of the whole document in order. A chunk without a marker yields (text, None); a marker without
    text yields (None, index). Used to score interleaved consistency.
    """
    pairs = []
    image_idx = 0
    for chunk in text.strip().split(" then "):
        parts = chunk.split(IMAGE_TOKEN)
        n_markers = len(parts) - 1
        words = " ".join(p.strip() for p in parts if p.strip())
        idx = image_idx if n_markers else None
        image_idx += n_markers
        pairs.append((words or None, idx))
    return pairs


# ----------------------------------------------------------------------------------------------------- documents

@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """How documents are drawn. `kind_weights` follows KINDS; the eval split mixes held-out and seen images."""

    seed: int = 0
    kind_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    eval_held_out_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    kind: str
    images: np.ndarray            # uint8 [n, 32, 32, 3]
    specs: tuple[ImageSpec, ...]

    @property
    def held_out(self) -> tuple[bool, ...]:
        return tuple(is_held_out(s) for s in self.specs)


def _sample_spec(split: str, rng: np.random.Generator, cfg: GeneratorConfig) -> ImageSpec:
    if split == "eval" and rng.uniform() < cfg.eval_held_out_fraction:
        pool = held_out_pairs()
    else:
        pool = seen_pairs()  # train never sees a held-out combination
    return pool[int(rng.integers(len(pool)))]


def generate_document(split: str, index: int, cfg: GeneratorConfig = GeneratorConfig()) -> Document:
    """Document `index` of `split` ('train' | 'eval'): a pure function of (cfg.seed, split, index)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown shapes-world split {split!r}; known: {tuple(_SPLIT_CODES)}")
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
    cum = np.cumsum(np.asarray(cfg.kind_weights, np.float64))
    kind = KINDS[min(int(np.searchsorted(cum, rng.uniform() * cum[-1], side="right")), len(KINDS) - 1)]
    n = int(rng.integers(2, 3, endpoint=True)) if kind == "interleaved" else 1
    specs = tuple(_sample_spec(split, rng, cfg) for _ in range(n))
    images = np.stack([render(s, rng) for s in specs])
    return Document(make_document(kind, list(specs)), kind, images, specs)


# ------------------------------------------------------------------------------------------------------- judging

_PALETTE = np.asarray([BACKGROUND] + [RGB[c] for c in COLORS], np.float32)  # index 0 = white
MIN_OBJECT_PIXELS = 12


def _classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle from a boolean object mask, by bounding-box fill and vertical mass balance."""
    # Drop isolated specks (fewer than 2 of the 8 neighbours set) so stray pixels don't inflate the bounding box.
    padded = np.pad(mask, 1)
    neighbours = sum(np.roll(np.roll(padded, dy, 0), dx, 1)
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)[1:-1, 1:-1]
    core = mask & (neighbours >= 2)
    if core.sum() >= MIN_OBJECT_PIXELS:
        mask = core
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    fill = len(rows) / float((y1 - y0) * (x1 - x0))
    # A triangle pointing up carries ~3/4 of its mass in the lower half of its box; circles and squares ~1/2.
    lower = np.mean(rows + 0.5 >= (y0 + y1) / 2.0)
    if lower > 0.62:
        return "triangle"
    return "square" if fill > 0.9 else "circle"


def judge_half(half_img: np.ndarray) -> tuple[str | None, str | None]:
    """(color, shape) of the dominant non-white colour in one half, or (None, None) if it is (almost) empty."""
    px = np.asarray(half_img, np.float32)[..., :3]
    dist = ((px[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # [H, W, 5]
    nearest = dist.argmin(-1)
    counts = np.bincount(nearest.ravel(), minlength=len(_PALETTE))[1:]
    if counts.max() < MIN_OBJECT_PIXELS:
        return None, None
    color_idx = int(counts.argmax())
    return COLORS[color_idx], _classify_shape(nearest == color_idx + 1)


def judge_image(img: np.ndarray) -> tuple[str | None, str | None, str | None, str | None]:
    """(left_color, left_shape, right_color, right_shape) judged from a uint8 [32, 32, 3] image."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise ValueError(f"judge_image expects an [H, W, 3] image, got shape {img.shape}")
    mid = img.shape[1] // 2
    return judge_half(img[:, :mid]) + judge_half(img[:, mid:])
