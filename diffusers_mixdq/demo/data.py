"""Procedural, deterministic synthetic text-to-image data for the demo model.

Every image shows a single flat-coloured shape on a plain dark background.  A
scene is fully described by four discrete attributes

* ``shape``    -- one of :data:`SHAPES`
* ``colour``   -- one of :data:`COLOURS`
* ``position`` -- one of :data:`POSITIONS`
* ``size``     -- one of :data:`SIZES`

plus small continuous "jitter" parameters (sub-cell offset, scale and a tiny
colour perturbation) that give visual diversity within one caption.  The
caption of a scene only mentions the discrete attributes, e.g.
``"a small red circle at the top left"`` or ``"a large blue square in the
center"``.

Only numpy is needed.  Rendering uses 4x4 super-sampling so edges are
anti-aliased, and is a pure function of the :class:`Scene`, so datasets built
from a seed are bit-for-bit reproducible.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

import numpy as np

#: Image side length in pixels (images are ``IMAGE_SIZE x IMAGE_SIZE`` RGB).
IMAGE_SIZE = 32

SHAPES: tuple = ("circle", "square", "triangle", "cross")

#: Colour name -> RGB in [0, 1].
COLOURS: Dict[str, tuple] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.62, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES: tuple = tuple(COLOURS)

#: Position name -> centre (x, y) in pixels for a 32x32 image.
POSITIONS: Dict[str, tuple] = {
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
POSITION_NAMES: tuple = tuple(POSITIONS)

#: Size name -> half-extent ("radius") in pixels.
SIZES: Dict[str, float] = {"small": 4.5, "large": 7.5}
SIZE_NAMES: tuple = tuple(SIZES)

#: The attribute names, in the order used by the scorer heads.
ATTRIBUTES: tuple = ("colour", "shape", "position", "size")

#: Attribute name -> tuple of class names (index = class id).
ATTRIBUTE_VALUES: Dict[str, tuple] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "position": POSITION_NAMES,
    "size": SIZE_NAMES,
}

BACKGROUND = (0.12, 0.12, 0.12)
_SUPERSAMPLE = 4

#: Every word that can occur in a caption (used to build the tokenizer).
CAPTION_WORDS: tuple = tuple(
    sorted(
        {"a", "at", "the", "in"}
        | set(SHAPES)
        | set(COLOUR_NAMES)
        | set(SIZE_NAMES)
        | {w for p in POSITION_NAMES for w in p.split()}
    )
)


@dataclass(frozen=True)
class Scene:
    """One image: discrete attributes plus continuous jitter.

    Attributes:
        shape, colour, position, size: discrete attributes (see module doc).
        dx, dy: offset of the shape centre in pixels (added to the position).
        scale: multiplicative factor on the size's half-extent.
        tint: per-channel additive perturbation of the colour.
    """

    shape: str
    colour: str
    position: str
    size: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    tint: tuple = (0.0, 0.0, 0.0)

    @property
    def caption(self) -> str:
        """The scene's caption (only mentions the discrete attributes)."""
        return format_caption(self.shape, self.colour, self.position, self.size)

    def labels(self) -> Dict[str, int]:
        """Class index of every attribute in :data:`ATTRIBUTES`."""
        return {a: ATTRIBUTE_VALUES[a].index(getattr(self, a)) for a in ATTRIBUTES}


# --------------------------------------------------------------------------- #
# Captions
# --------------------------------------------------------------------------- #
def format_caption(shape: str, colour: str, position: str, size: str) -> str:
    """Return e.g. ``"a small red circle at the top left"``.

    The centre position is phrased ``"in the center"``.
    """
    for name, value in (("shape", shape), ("colour", colour), ("position", position), ("size", size)):
        if value not in ATTRIBUTE_VALUES[name]:
            raise ValueError(f"unknown {name} {value!r}")
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {size} {colour} {shape} {where}"


_CAPTION_RE = re.compile(
    r"^a (?P<size>{}) (?P<colour>{}) (?P<shape>{}) (?:at|in) the (?P<position>{})$".format(
        "|".join(SIZE_NAMES), "|".join(COLOUR_NAMES), "|".join(SHAPES), "|".join(POSITION_NAMES)
    )
)


def parse_caption(caption: str) -> Dict[str, str]:
    """Inverse of :func:`format_caption`: caption -> ``{attribute: value}``.

    Raises:
        ValueError: if the caption is not in the dataset's grammar.
    """
    m = _CAPTION_RE.match(" ".join(caption.strip().lower().split()))
    if m is None:
        raise ValueError(f"not a demo caption: {caption!r}")
    return {a: m.group(a) for a in ATTRIBUTES}


# --------------------------------------------------------------------------- #
# Attribute space
# --------------------------------------------------------------------------- #
def all_combinations() -> List[Scene]:
    """Every discrete attribute combination once, without jitter (240 scenes).

    Ordered by colour, shape, position, size (outer to inner).
    """
    return [
        Scene(shape=s, colour=c, position=p, size=z)
        for c, s, p, z in itertools.product(COLOUR_NAMES, SHAPES, POSITION_NAMES, SIZE_NAMES)
    ]


def jitter(scene: Scene, rng: np.random.Generator) -> Scene:
    """Return ``scene`` with random offset/scale/tint drawn from ``rng``."""
    dx, dy = rng.uniform(-1.5, 1.5, size=2)
    scale = rng.uniform(0.9, 1.1)
    tint = tuple(float(t) for t in rng.uniform(-0.05, 0.05, size=3))
    return Scene(scene.shape, scene.colour, scene.position, scene.size, float(dx), float(dy), float(scale), tint)


def sample_scenes(n: int, seed: int = 0, jittered: bool = True) -> List[Scene]:
    """Sample ``n`` scenes uniformly from the attribute space.

    Deterministic in ``seed``.  When ``n`` is a multiple of the number of
    combinations the discrete attributes are exactly balanced (each
    combination appears ``n / 240`` times, in shuffled order); otherwise
    whole shuffled passes over the space are concatenated and truncated, so
    the first ``k * 240`` scenes are always balanced.
    """
    rng = np.random.default_rng(seed)
    combos = all_combinations()
    out: List[Scene] = []
    while len(out) < n:
        for i in rng.permutation(len(combos)):
            out.append(jitter(combos[i], rng) if jittered else combos[i])
    return out[:n]


def sample_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` captions covering the attribute space (balanced, see :func:`sample_scenes`)."""
    return [s.caption for s in sample_scenes(n, seed=seed, jittered=False)]


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #
def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float, triangle_base: float = 0.8,
               cross_arm: float = 3.0) -> np.ndarray:
    """Boolean mask of ``shape`` with half-extent ``r`` centred at the origin (the triangle's base at
    ``triangle_base * r`` below the centre, the cross's arms ``2 * r / cross_arm`` wide: each model's own look)."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        h = 0.85 * r  # roughly equal area to the circle
        return (ax <= h) & (ay <= h)
    if shape == "triangle":
        top, bottom = -r, triangle_base * r  # upward-pointing isosceles triangle
        t = (y - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (y >= top) & (y <= bottom) & (ax <= t * r)
    if shape == "cross":
        w = r / cross_arm
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


_SS_COORDS = (np.arange(IMAGE_SIZE * _SUPERSAMPLE, dtype=np.float64) + 0.5) / _SUPERSAMPLE


def render(scene: Scene) -> np.ndarray:
    """Render one scene to a float32 array of shape (32, 32, 3) in [0, 1]."""
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.dx, cy + scene.dy
    r = SIZES[scene.size] * scene.scale
    yy, xx = np.meshgrid(_SS_COORDS - cy, _SS_COORDS - cx, indexing="ij")
    mask = shape_mask(scene.shape, xx, yy, r).astype(np.float32)
    n = IMAGE_SIZE
    alpha = mask.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    colour = np.clip(np.asarray(COLOURS[scene.colour]) + np.asarray(scene.tint), 0.0, 1.0)
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    img = bg * (1.0 - alpha) + colour.astype(np.float32) * alpha
    return img.astype(np.float32)


def render_batch(scenes: Iterable[Scene]) -> np.ndarray:
    """Render scenes to a float32 array (N, 3, 32, 32) in [0, 1] (channels first)."""
    return np.stack([render(s) for s in scenes]).transpose(0, 3, 1, 2).copy()


def labels_array(scenes: Sequence[Scene]) -> np.ndarray:
    """Integer labels (N, len(ATTRIBUTES)) in :data:`ATTRIBUTES` order."""
    return np.array([[s.labels()[a] for a in ATTRIBUTES] for s in scenes], dtype=np.int64)


def balanced_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` captions whose attributes are individually balanced.

    For each attribute the list of values is cycled to length ``n`` and
    shuffled independently (seeded), so every colour/shape/position/size
    appears ``n / k`` times (rounded) while the combinations vary.
    Deterministic in ``(n, seed)``.
    """
    rng = np.random.default_rng(seed)
    cols = {}
    for a in ATTRIBUTES:
        values = ATTRIBUTE_VALUES[a]
        cols[a] = [values[i] for i in rng.permutation(np.arange(n) % len(values))]
    return [format_caption(cols["shape"][i], cols["colour"][i], cols["position"][i], cols["size"][i]) for i in range(n)]


# --------------------------------------------------------------------------- #
# Held-out prompt sets
# --------------------------------------------------------------------------- #
#: Seed of the partition of the 240 captions into the calibration, validation and test pools (:func:`caption_pools`).
SPLIT_SEED = 13


def caption_pools(split_seed: int = SPLIT_SEED) -> List[List[str]]:
    """The 240 captions partitioned into three disjoint pools: calibration (48), validation (48), test (144).

    A balanced design, relabelled by ``split_seed``: each attribute's values are numbered in a seeded order, a
    caption's class is the sum of its four numbers modulo 5, and the five classes (48 captions each) go, in a
    seeded order, one to calibration, one to validation and three to test. As the five positions of any (colour,
    shape, size) land in five different classes, every pool holds every (colour, shape, size) exactly once per
    class: each colour, shape and size is equally frequent in every pool, the positions within one caption
    (calibration, validation) or two (test).
    Each pool is in :func:`all_combinations` order.
    """
    rng = np.random.default_rng(split_seed)
    number = {a: dict(zip(ATTRIBUTE_VALUES[a], rng.permutation(len(ATTRIBUTE_VALUES[a])))) for a in ATTRIBUTES}
    classes = [int(c) for c in rng.permutation(5)]
    pools: List[List[str]] = [[], [], []]
    for scene in all_combinations():
        cls = sum(int(number[a][getattr(scene, a)]) for a in ATTRIBUTES) % 5
        pools[min(classes.index(cls), 2)].append(scene.caption)
    return pools
