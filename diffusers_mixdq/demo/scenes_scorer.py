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

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .scenes_data import (
    ATTRIBUTES,
    CANONICAL_ATTRIBUTES,
    CANONICAL_VALUES,
    IMAGE_SIZE,
    canonical,
    format_caption,
    parse_caption,
)
from .scorer import ImageInput, frechet_distance, to_tensor  # noqa: F401  (re-exported)

#: Directory of the bundled scorer weights (``config.json`` + ``model.safetensors``).
DEFAULT_SCORER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenes", "scorer")

#: Keys of :meth:`SceneScorer.score` that are accuracies.
SCORE_KEYS: tuple = ATTRIBUTES + ("colour", "shape", "all")


class SceneCNN(nn.Module):
    """CNN with one classification head per canonical attribute (axis, slot a/b colour and shape)."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: Optional[Dict[str, int]] = None):
        super().__init__()
        num_classes = num_classes or {a: len(CANONICAL_VALUES[a]) for a in CANONICAL_ATTRIBUTES}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),  # 16x16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * w * (IMAGE_SIZE // 8) ** 2, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, n) for a, n in num_classes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations for images in [-1, 1], (N, 3, 32, 32)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.features(x)
        return {a: head(f) for a, head in self.heads.items()}


class SceneScorer:
    """Wraps a trained :class:`SceneCNN` for alignment scoring and features."""

    def __init__(self, model: SceneCNN, batch_size: int = 256):
        self.model = model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, images: ImageInput) -> Dict[str, torch.Tensor]:
        """Predicted class index per canonical attribute, each a LongTensor (N,)."""
        x = to_tensor(images) * 2 - 1
        outs: Dict[str, List[torch.Tensor]] = {a: [] for a in self.model.heads}
        for i in range(0, len(x), self.batch_size):
            for a, logits in self.model(x[i : i + self.batch_size]).items():
                outs[a].append(logits.argmax(-1))
        return {a: torch.cat(v) for a, v in outs.items()}

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
        aligned = torch.ones(len(rows), dtype=torch.bool)
        for a in ATTRIBUTES:
            aligned &= out[a]
        out["aligned"] = aligned
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

    @torch.no_grad()
    def features(self, images: ImageInput) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim) for :func:`frechet_distance`."""
        x = to_tensor(images) * 2 - 1
        return torch.cat([self.model.features(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])


def load_scorer(path: Optional[str] = None) -> SceneScorer:
    """Load the scenes scorer from ``path`` (default: the bundled ``demo/scenes/scorer/``)."""
    from safetensors.torch import load_file

    path = path or DEFAULT_SCORER_DIR
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = SceneCNN(width=cfg["width"], feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"])
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return SceneScorer(model)


def labels_to_tensor(labels: np.ndarray) -> Dict[str, torch.Tensor]:
    """(N, 5) canonical label array -> ``{attribute: LongTensor}``."""
    t = torch.from_numpy(np.asarray(labels))
    return {a: t[:, i] for i, a in enumerate(CANONICAL_ATTRIBUTES)}
