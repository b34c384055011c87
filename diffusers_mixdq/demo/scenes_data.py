"""Procedural two-object scenes with a spatial relation, for the ``scenes`` demo model.

Every image is 32x32 RGB and shows two flat-coloured objects on a plain dark
background.  A caption names both objects (colour + shape) and how the first
stands relative to the second::

    "a red circle to the left of a blue square"
    "a green cross above a white triangle"

* colours: :data:`COLOURS` (6), shapes: :data:`SHAPES` (4)
* relations: :data:`RELATIONS` -- ``left of``, ``right of``, ``above``, ``below``
  (phrased "to the left of", "to the right of", "above", "below")
* the two objects always differ in colour **and** in shape, so a scene is
  unambiguous and binding colours to shapes matters.

That gives 24 * 15 * 4 = 1,440 captions.  Because "A left of B" and "B right
of A" show the same layout, the 1,440 captions describe 720 *canonical scenes*
(:func:`canonical`): an axis (horizontal / vertical) plus the object in the
first slot (left or top) and the object in the second slot (right or bottom).
The attribute scorer (:mod:`diffusers_mixdq.demo.scenes_scorer`) predicts this
canonical form.

Layout (continuous jitter drawn per image): each object has a half-extent of
3.8-5.2 px; along the relation's axis the centres are 11-17 px apart, across
it they differ by at most 5 px, so the relation is always clear and objects
never overlap.

Prompt sets (:func:`prompt_sets`) -- three disjoint sets of caption strings:

* the 720 canonical scenes are split into three pools of 240 with a
  permutation seeded by :data:`SPLIT_SEED` (= 13); each pool holds both
  phrasings of its scenes (480 captions), so the pools are disjoint even up to
  re-phrasing;
* ``calibration`` draws from pool 0 with seed :data:`CALIBRATION_SEED` (= 101),
  ``validation`` from pool 1 with seed :data:`VALIDATION_SEED` (= 202) and
  ``test`` from pool 2 with seed :data:`TEST_SEED` (= 303), each a balanced
  draw (:func:`_balanced_from_pool`).

Training uses all 1,440 captions (the model is not asked to generalise to
unseen combinations; the sets only keep plan building and evaluation apart).

Only numpy is needed; rendering is a pure function of the :class:`Scene`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from .data import _SUPERSAMPLE, BACKGROUND, COLOUR_NAMES, COLOURS, IMAGE_SIZE, SHAPES, shape_mask

#: Relation name -> phrase used in captions.
RELATIONS: Dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
RELATION_NAMES: tuple = tuple(RELATIONS)

#: Layout axis of a canonical scene (index = scorer class id).
AXES: tuple = ("horizontal", "vertical")

#: The prompt attributes, in order (object 1 = the caption's first object).
ATTRIBUTES: tuple = ("colour1", "shape1", "relation", "colour2", "shape2")

#: Attribute name -> tuple of class names.
ATTRIBUTE_VALUES: Dict[str, tuple] = dict(zip(ATTRIBUTES, (COLOUR_NAMES, SHAPES, RELATION_NAMES, COLOUR_NAMES, SHAPES)))

#: Canonical (scorer) labels: layout axis, then the first slot (left/top) and
#: second slot (right/bottom) objects.
CANONICAL_ATTRIBUTES: tuple = ("axis", "colour_a", "shape_a", "colour_b", "shape_b")
CANONICAL_VALUES: Dict[str, tuple] = dict(zip(CANONICAL_ATTRIBUTES, (AXES, COLOUR_NAMES, SHAPES, COLOUR_NAMES, SHAPES)))

#: Seeds of the prompt sets (see the module docstring).
SPLIT_SEED = 13
CALIBRATION_SEED = 101
VALIDATION_SEED = 202
TEST_SEED = 303

#: Every word that can occur in a caption (used to build the tokenizer).
CAPTION_WORDS: tuple = tuple(
    sorted({"a"} | set(SHAPES) | set(COLOUR_NAMES) | {w for p in RELATIONS.values() for w in p.split()})
)


# --------------------------------------------------------------------------- #
# Captions
# --------------------------------------------------------------------------- #
def format_caption(colour1: str, shape1: str, relation: str, colour2: str, shape2: str) -> str:
    """Return e.g. ``"a red circle to the left of a blue square"``."""
    for name, value in (("colour1", colour1), ("shape1", shape1), ("relation", relation),
                        ("colour2", colour2), ("shape2", shape2)):  # fmt: skip
        if value not in ATTRIBUTE_VALUES[name]:
            raise ValueError(f"unknown {name} {value!r}")
    if colour1 == colour2 or shape1 == shape2:
        raise ValueError("the two objects must differ in colour and in shape")
    return f"a {colour1} {shape1} {RELATIONS[relation]} a {colour2} {shape2}"


_PHRASE_TO_RELATION = {v: k for k, v in RELATIONS.items()}
_CAPTION_RE = re.compile(
    r"^a (?P<colour1>{c}) (?P<shape1>{s}) (?P<phrase>{r}) a (?P<colour2>{c}) (?P<shape2>{s})$".format(
        c="|".join(COLOUR_NAMES), s="|".join(SHAPES), r="|".join(RELATIONS.values())
    )
)


def parse_caption(caption: str) -> Dict[str, str]:
    """Inverse of :func:`format_caption`: caption -> ``{attribute: value}`` (keys :data:`ATTRIBUTES`).

    Raises:
        ValueError: if the caption is not in the grammar.
    """
    m = _CAPTION_RE.match(" ".join(caption.strip().lower().split()))
    if m is None or m.group("colour1") == m.group("colour2") or m.group("shape1") == m.group("shape2"):
        raise ValueError(f"not a scenes caption: {caption!r}")
    out = {a: m.group(a) for a in ("colour1", "shape1", "colour2", "shape2")}
    out["relation"] = _PHRASE_TO_RELATION[m.group("phrase")]
    return {a: out[a] for a in ATTRIBUTES}


def canonical(attrs: Dict[str, str]) -> Dict[str, str]:
    """Caption attributes -> canonical layout ``{axis, colour_a, shape_a, colour_b, shape_b}``.

    Slot ``a`` is the left (horizontal) or top (vertical) object.
    """
    first = (attrs["colour1"], attrs["shape1"])
    second = (attrs["colour2"], attrs["shape2"])
    rel = attrs["relation"]
    axis = "horizontal" if rel in ("left of", "right of") else "vertical"
    a, b = (first, second) if rel in ("left of", "above") else (second, first)
    return {"axis": axis, "colour_a": a[0], "shape_a": a[1], "colour_b": b[0], "shape_b": b[1]}


def all_captions() -> List[str]:
    """All 1,440 captions, in a fixed order (colour1, shape1, relation, colour2, shape2)."""
    out = []
    for c1, s1, r, c2, s2 in itertools.product(COLOUR_NAMES, SHAPES, RELATION_NAMES, COLOUR_NAMES, SHAPES):
        if c1 != c2 and s1 != s2:
            out.append(format_caption(c1, s1, r, c2, s2))
    return out


def _canonical_key(caption: str) -> Tuple[str, ...]:
    c = canonical(parse_caption(caption))
    return tuple(c[a] for a in CANONICAL_ATTRIBUTES)


# --------------------------------------------------------------------------- #
# Scenes
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Scene:
    """One image: a caption's attributes plus continuous layout/jitter.

    ``xy1``/``xy2`` are the object centres in pixels, ``r1``/``r2`` their
    half-extents, ``tint1``/``tint2`` small additive colour perturbations.
    """

    colour1: str
    shape1: str
    relation: str
    colour2: str
    shape2: str
    xy1: tuple = (10.0, 16.0)
    xy2: tuple = (22.0, 16.0)
    r1: float = 4.5
    r2: float = 4.5
    tint1: tuple = (0.0, 0.0, 0.0)
    tint2: tuple = (0.0, 0.0, 0.0)

    @property
    def caption(self) -> str:
        return format_caption(self.colour1, self.shape1, self.relation, self.colour2, self.shape2)

    def attributes(self) -> Dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def canonical_labels(self) -> Dict[str, int]:
        """Class index of every :data:`CANONICAL_ATTRIBUTES` entry (the scorer's targets)."""
        c = canonical(self.attributes())
        return {a: CANONICAL_VALUES[a].index(c[a]) for a in CANONICAL_ATTRIBUTES}


def scene_from_caption(caption: str, rng: np.random.Generator) -> Scene:
    """Draw a random layout for ``caption`` from ``rng``."""
    attrs = parse_caption(caption)
    rel = attrs["relation"]
    # positions along the axis: lower object centre in [6.5, 13.5], gap 11..17, upper <= 25.5
    lo = rng.uniform(6.5, 13.5)
    gap = rng.uniform(11.0, 17.0)
    hi = min(lo + gap, 25.5)
    cross = rng.uniform(9.0, 23.0)
    d = rng.uniform(-2.5, 2.5)
    c_first, c_second = float(np.clip(cross + d, 6.5, 25.5)), float(np.clip(cross - d, 6.5, 25.5))
    first_low = rel in ("left of", "above")  # first object has the smaller coordinate on the axis
    p_first, p_second = (lo, hi) if first_low else (hi, lo)
    if rel in ("left of", "right of"):
        xy1, xy2 = (float(p_first), c_first), (float(p_second), c_second)
    else:
        xy1, xy2 = (c_first, float(p_first)), (c_second, float(p_second))
    r1, r2 = (float(v) for v in rng.uniform(3.8, 5.2, size=2))
    t1 = tuple(float(t) for t in rng.uniform(-0.05, 0.05, size=3))
    t2 = tuple(float(t) for t in rng.uniform(-0.05, 0.05, size=3))
    return Scene(attrs["colour1"], attrs["shape1"], rel, attrs["colour2"], attrs["shape2"],
                 xy1, xy2, r1, r2, t1, t2)  # fmt: skip


def sample_scenes(n: int, seed: int = 0) -> List[Scene]:
    """``n`` scenes; captions cycle through shuffled passes over all 1,440 (balanced), layouts random.

    Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    caps = all_captions()
    out: List[Scene] = []
    while len(out) < n:
        for i in rng.permutation(len(caps)):
            out.append(scene_from_caption(caps[i], rng))
            if len(out) == n:
                break
    return out


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #
_SS = (np.arange(IMAGE_SIZE * _SUPERSAMPLE, dtype=np.float64) + 0.5) / _SUPERSAMPLE


def render(scene: Scene) -> np.ndarray:
    """Render one scene to float32 (32, 32, 3) in [0, 1]."""
    n = IMAGE_SIZE
    img = np.broadcast_to(np.asarray(BACKGROUND, dtype=np.float32), (n, n, 3)).copy()
    for colour, shape, (cx, cy), r, tint in (
        (scene.colour1, scene.shape1, scene.xy1, scene.r1, scene.tint1),
        (scene.colour2, scene.shape2, scene.xy2, scene.r2, scene.tint2),
    ):
        yy, xx = np.meshgrid(_SS - cy, _SS - cx, indexing="ij")
        mask = shape_mask(shape, xx, yy, r, triangle_base=0.85, cross_arm=2.8).astype(np.float32)
        alpha = mask.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        col = np.clip(np.asarray(COLOURS[colour]) + np.asarray(tint), 0.0, 1.0).astype(np.float32)
        img = img * (1.0 - alpha) + col * alpha
    return img.astype(np.float32)


def render_batch(scenes: Iterable[Scene]) -> np.ndarray:
    """Render scenes to float32 (N, 3, 32, 32) in [0, 1]."""
    return np.stack([render(s) for s in scenes]).transpose(0, 3, 1, 2).copy()


def canonical_labels_array(scenes: Sequence[Scene]) -> np.ndarray:
    """Integer labels (N, 5) in :data:`CANONICAL_ATTRIBUTES` order."""
    return np.array([[s.canonical_labels()[a] for a in CANONICAL_ATTRIBUTES] for s in scenes], dtype=np.int64)


# --------------------------------------------------------------------------- #
# Prompt sets
# --------------------------------------------------------------------------- #
def _balanced_from_pool(pool: Sequence[str], n: int, seed: int) -> List[str]:
    """``n`` distinct captions from ``pool``, attribute values as balanced as the pool allows.

    Greedy: visit the pool in a seeded order and take a caption when none of
    its attribute values is already at its quota ``ceil(n / k)``; then top up
    with the remaining captions in the same order.  Deterministic.
    """
    if n > len(pool):
        raise ValueError(f"asked for {n} prompts from a pool of {len(pool)}")
    rng = np.random.default_rng(seed)
    order = [pool[i] for i in rng.permutation(len(pool))]
    quota = {a: -(-n // len(ATTRIBUTE_VALUES[a])) for a in ATTRIBUTES}
    counts: Dict[Tuple[str, str], int] = {}
    chosen: List[str] = []
    taken = set()
    for cap in order:
        if len(chosen) == n:
            break
        attrs = parse_caption(cap)
        if all(counts.get((a, attrs[a]), 0) < quota[a] for a in ATTRIBUTES):
            chosen.append(cap)
            taken.add(cap)
            for a in ATTRIBUTES:
                counts[(a, attrs[a])] = counts.get((a, attrs[a]), 0) + 1
    for cap in order:
        if len(chosen) == n:
            break
        if cap not in taken:
            chosen.append(cap)
            taken.add(cap)
    return chosen


def balanced_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct captions (n <= 1440) from the whole space, attributes balanced. Deterministic."""
    return _balanced_from_pool(all_captions(), n, seed)


def caption_pools() -> List[List[str]]:
    """The three disjoint caption pools (480 each) used by :func:`prompt_sets` (seed :data:`SPLIT_SEED`)."""
    caps = all_captions()
    keys = sorted({_canonical_key(c) for c in caps})
    rng = np.random.default_rng(SPLIT_SEED)
    perm = rng.permutation(len(keys))
    pool_of = {keys[k]: i * 3 // len(keys) for i, k in enumerate(perm)}
    pools: List[List[str]] = [[], [], []]
    for c in caps:
        pools[pool_of[_canonical_key(c)]].append(c)
    return pools


def prompt_sets(n_calibration: int = 256, n_validation: int = 256, n_test: int = 256) -> Dict[str, List[str]]:
    """Three disjoint prompt sets ``{"calibration", "validation", "test"}`` (each n <= 480).

    See the module docstring for the seeds.  The first ``k`` test prompts for
    ``n_test = k`` are not a prefix of a larger draw; always ask for the size you use.
    """
    pools = caption_pools()
    return {
        "calibration": _balanced_from_pool(pools[0], n_calibration, CALIBRATION_SEED),
        "validation": _balanced_from_pool(pools[1], n_validation, VALIDATION_SEED),
        "test": _balanced_from_pool(pools[2], n_test, TEST_SEED),
    }


def test_prompts(n: int = 256) -> List[str]:
    """The test prompt set (see :func:`prompt_sets`)."""
    return prompt_sets(1, 1, n)["test"]


#: Eight fixed prompts for a demo grid (all relations, every colour and shape).
DEMO_PROMPTS: List[str] = [
    "a red circle to the left of a blue square",
    "a green triangle above a yellow cross",
    "a white square to the right of a purple circle",
    "a blue cross below a red triangle",
    "a yellow circle above a green square",
    "a purple triangle to the left of a white cross",
    "a red square below a yellow circle",
    "a green cross to the right of a blue triangle",
]


# --------------------------------------------------------------------------- #
# Bundled model
# --------------------------------------------------------------------------- #
import json as _json  # noqa: E402
import os as _os  # noqa: E402

#: Directory of the bundled ``scenes`` model: ``pipeline/``, ``scorer/``, ``defaults.json``.
SCENES_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "scenes")


def pipeline_path() -> str:
    """Directory of the bundled ``PixArtSigmaPipeline`` (``DiffusionPipeline.from_pretrained`` it)."""
    return _os.path.join(SCENES_DIR, "pipeline")


def defaults() -> Dict[str, object]:
    """Generation kwargs of the bundled pipeline (``defaults.json``): steps, guidance, size,
    ``max_sequence_length``, ``use_resolution_binning=False``, ``clean_caption=False``."""
    with open(_os.path.join(SCENES_DIR, "defaults.json")) as f:
        return _json.load(f)


def pipeline_kwargs() -> Dict[str, object]:
    """:func:`defaults` as keyword arguments for ``pipe(prompts, **pipeline_kwargs(), generator=...)``."""
    d = defaults()
    return {k: d[k] for k in ("num_inference_steps", "guidance_scale", "height", "width", "max_sequence_length",
                              "use_resolution_binning", "clean_caption")}  # fmt: skip

