"""Text-alignment scorer for the ``scenes`` demo pipeline (two objects + a relation).

A small CNN (trained by ``examples/train_scenes/train_scorer.py``) reads the
*canonical layout* of a 32x32 image (see
:func:`diffusers_mixdq.demo.scenes_data.canonical`): the layout axis
(horizontal / vertical) and the colour and shape of the object in the first
slot (left or top) and in the second slot (right or bottom).

Scoring an image against its prompt ``"a C1 S1 <relation> a C2 S2"``:

1. the prompt is turned into its canonical layout, giving the slot each
   prompt object should occupy;
2. the predicted slot objects are matched to the prompt objects, either in the
   expected order or swapped -- swapped only when that matches strictly more
   colour/shape attributes;
3. ``colour1``/``shape1``/``colour2``/``shape2`` are correct when the matched
   predicted object has that attribute; ``relation`` is correct when the axis
   is right and the objects are not swapped.  So a picture with the right
   objects in the wrong order counts as right objects, wrong relation.

``aligned`` (per image) = all five correct; ``all`` is its mean.

Example::

    from diffusers_mixdq.demo.scenes_scorer import load_scorer
    scorer = load_scorer()
    images = pipe(prompts, ..., output_type="pt").images     # (N, 3, 32, 32) in [0, 1]
    result = scorer.score(images, prompts)
    result["all"], result["relation"], result["aligned"]      # floats, and a list of bools
"""

from __future__ import annotations


import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .scenes_data import (
    ATTRIBUTES,
    CANONICAL_ATTRIBUTES,
    CANONICAL_VALUES,
    canonical,
    format_caption,
    parse_caption,
)
from .scorer import HeadsCNN, HeadsScorer, ImageInput, frechet_distance, load_weights, to_tensor  # noqa: F401

#: Directory of the bundled scorer weights (``config.json`` + ``model.safetensors``).
DEFAULT_SCORER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenes", "scorer")

#: Keys of :meth:`SceneScorer.score` that are accuracies.
SCORE_KEYS: tuple = ATTRIBUTES + ("colour", "shape", "all")


class SceneCNN(HeadsCNN):
    """CNN with one classification head per canonical attribute (axis, slot a/b colour and shape): one more
    full-resolution convolution than the shapes scorer's."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: Optional[Dict[str, int]] = None):
        w = width
        convs = [(3, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 2 * w, 2), (2 * w, 2 * w, 2)]
        super().__init__(convs, feature_dim,
                         num_classes or {a: len(CANONICAL_VALUES[a]) for a in CANONICAL_ATTRIBUTES})


class SceneScorer(HeadsScorer):
    """Wraps a trained :class:`SceneCNN` for alignment scoring and features (predictions per canonical attribute)."""

    def predict_layouts(self, images: ImageInput) -> List[Dict[str, str]]:
        """Predicted canonical layout of each image, as names."""
        pred = self.predict(images)
        n = len(pred["axis"])
        return [{a: CANONICAL_VALUES[a][int(pred[a][i])] for a in CANONICAL_ATTRIBUTES} for i in range(n)]

    def predict_captions(self, images: ImageInput) -> List[str]:
        """A caption for each image ("left of" / "above" phrasing), or ``"?"`` when the two slots
        hold the same colour or shape (outside the grammar)."""
        out = []
        for lay in self.predict_layouts(images):
            rel = "left of" if lay["axis"] == "horizontal" else "above"
            try:
                out.append(format_caption(lay["colour_a"], lay["shape_a"], rel, lay["colour_b"], lay["shape_b"]))
            except ValueError:
                out.append("?")
        return out

    def per_image(self, images: ImageInput, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Per-image correctness: ``{attribute: BoolTensor (N,)}`` for :data:`ATTRIBUTES`, ``colour``,
        ``shape`` (both objects) and ``aligned`` (everything right)."""
        layouts = self.predict_layouts(images)
        if len(prompts) != len(layouts):
            raise ValueError(f"{len(prompts)} prompts for {len(layouts)} images")
        rows = []
        for lay, prompt in zip(layouts, prompts):
            attrs = parse_caption(prompt)
            target = canonical(attrs)
            first_in_a = attrs["relation"] in ("left of", "above")
            pa, pb = (lay["colour_a"], lay["shape_a"]), (lay["colour_b"], lay["shape_b"])
            ta, tb = (target["colour_a"], target["shape_a"]), (target["colour_b"], target["shape_b"])

            def m(p, t):
                return int(p[0] == t[0]) + int(p[1] == t[1])

            swapped = m(pa, tb) + m(pb, ta) > m(pa, ta) + m(pb, tb)
            # predicted object matched to the prompt's first / second object
            slot_first = pa if first_in_a != swapped else pb
            slot_second = pb if first_in_a != swapped else pa
            ok = {
                "colour1": slot_first[0] == attrs["colour1"],
                "shape1": slot_first[1] == attrs["shape1"],
                "relation": (lay["axis"] == target["axis"]) and not swapped,
                "colour2": slot_second[0] == attrs["colour2"],
                "shape2": slot_second[1] == attrs["shape2"],
            }
            rows.append(ok)
        out = {a: torch.tensor([r[a] for r in rows], dtype=torch.bool) for a in ATTRIBUTES}
        out["colour"] = out["colour1"] & out["colour2"]
        out["shape"] = out["shape1"] & out["shape2"]
        out["aligned"] = torch.stack([out[a] for a in ATTRIBUTES]).all(0)
        return out

    def aligned(self, images: ImageInput, prompts: Sequence[str]) -> torch.Tensor:
        """BoolTensor (N,): image ``i`` shows everything prompt ``i`` asks for."""
        return self.per_image(images, prompts)["aligned"]

    def score(self, images: ImageInput, prompts: Sequence[str]) -> Dict[str, object]:
        """Alignment accuracies of ``images`` w.r.t. ``prompts``.

        Returns floats for every key of :data:`SCORE_KEYS` (``colour1``,
        ``shape1``, ``relation``, ``colour2``, ``shape2``, ``colour`` and
        ``shape`` for both objects, ``all`` = every attribute right), ``n``
        (int) and ``aligned`` (list of per-image bools).
        """
        per = self.per_image(images, prompts)
        result: Dict[str, object] = {a: per[a].float().mean().item() for a in ATTRIBUTES + ("colour", "shape")}
        result["all"] = per["aligned"].float().mean().item()
        result["n"] = len(prompts)
        result["aligned"] = per["aligned"].tolist()
        return result


def load_scorer(path: Optional[str] = None) -> SceneScorer:
    """Load the scenes scorer from ``path`` (default: the bundled ``demo/scenes/scorer/``)."""
    return SceneScorer(load_weights(SceneCNN, path or DEFAULT_SCORER_DIR))


def labels_to_tensor(labels: np.ndarray) -> Dict[str, torch.Tensor]:
    """(N, 5) canonical label array -> ``{attribute: LongTensor}``."""
    t = torch.from_numpy(np.asarray(labels))
    return {a: t[:, i] for i, a in enumerate(CANONICAL_ATTRIBUTES)}
