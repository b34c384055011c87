"""Text-alignment scorer for the demo pipeline.

A small CNN trained on the synthetic shapes data (see
``examples/train_demo/train_scorer.py``) predicts each caption attribute
(colour, shape, position, size) of a 32x32 image.  Comparing its predictions
with the attributes parsed from the prompts gives a text-alignment accuracy;
its penultimate-layer activations serve as features for a Fréchet distance
between two image sets (an FID analogue for this domain).

Example::

    from diffusers_mixdq.demo import load_pipeline, eval_prompts
    from diffusers_mixdq.demo.scorer import load_scorer, frechet_distance

    scorer = load_scorer()
    prompts = eval_prompts(64)
    images = pipe(prompts, output_type="pt").images      # (N, 3, 32, 32) in [0, 1]
    print(scorer.score(images, prompts))                  # {'colour': 0.98, ...}
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .data import ATTRIBUTE_VALUES, ATTRIBUTES, IMAGE_SIZE, parse_caption

ImageInput = Union[torch.Tensor, np.ndarray, Sequence["PIL.Image.Image"]]  # noqa: F821

#: Directory of the bundled scorer weights (``config.json`` + ``model.safetensors``).
DEFAULT_SCORER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scorer")


class HeadsCNN(nn.Module):
    """A small CNN: 3x3 convolutions (``convs``: ``(in, out, stride)`` each, ReLU after each), a linear feature
    layer of ``feature_dim``, and one classification head per attribute (``num_classes``)."""

    def __init__(self, convs, feature_dim: int, num_classes: Dict[str, int]):
        super().__init__()
        layers: List[nn.Module] = []
        for cin, cout, stride in convs:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.ReLU()]
        flat = convs[-1][1] * (IMAGE_SIZE // 8) ** 2  # three stride-2 convolutions: 32 -> 4
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, n) for a, n in num_classes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations for images ``x`` in [-1, 1], shape (N, 3, 32, 32)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-attribute logits for images ``x`` in [-1, 1]."""
        f = self.features(x)
        return {a: head(f) for a, head in self.heads.items()}


class AttributeCNN(HeadsCNN):
    """The shapes scorer's CNN: ``width`` channels, doubled after the first downsampling (32 -> 16 -> 8 -> 4)."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: Optional[Dict[str, int]] = None):
        w = width
        convs = [(3, w, 1), (w, w, 2), (w, 2 * w, 1), (2 * w, 2 * w, 2), (2 * w, 2 * w, 2)]
        super().__init__(convs, feature_dim, num_classes or {a: len(ATTRIBUTE_VALUES[a]) for a in ATTRIBUTES})


def to_tensor(images: ImageInput) -> torch.Tensor:
    """Convert images to a float32 tensor (N, 3, 32, 32) in [0, 1].

    Accepts a float tensor/array (N, 3, H, W) in [0, 1], a uint8 array
    (N, H, W, 3), or a list of PIL images; other sizes are resized to 32x32.
    """
    if isinstance(images, (list, tuple)):
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images)
        if images.dtype == np.uint8:
            x = x.float() / 255.0
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        x = images
    else:
        raise TypeError(f"unsupported image input {type(images)!r}")
    x = x.detach().float().cpu()
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return x.clamp(0.0, 1.0).contiguous()


class HeadsScorer:
    """A trained multi-head CNN (``model.heads``, ``model.features``) run in batches: class predictions per head and
    penultimate features. The shapes and scenes scorers add how predictions compare with a prompt."""

    def __init__(self, model: nn.Module, batch_size: int = 256):
        self.model = model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, images: ImageInput) -> Dict[str, torch.Tensor]:
        """Predicted class index per head, each a LongTensor (N,)."""
        x = to_tensor(images) * 2 - 1
        outs: Dict[str, List[torch.Tensor]] = {a: [] for a in self.model.heads}
        for i in range(0, len(x), self.batch_size):
            for a, logits in self.model(x[i : i + self.batch_size]).items():
                outs[a].append(logits.argmax(-1))
        return {a: torch.cat(v) for a, v in outs.items()}

    @torch.no_grad()
    def features(self, images: ImageInput) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim), float32, for :func:`frechet_distance`."""
        x = to_tensor(images) * 2 - 1
        return torch.cat([self.model.features(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])


def load_weights(model_cls, path: str) -> nn.Module:
    """A ``model_cls(width, feature_dim, num_classes)`` with the weights of a scorer directory (``config.json`` +
    ``model.safetensors``)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = model_cls(width=cfg["width"], feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"])
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model


class Scorer(HeadsScorer):
    """Wraps a trained :class:`AttributeCNN` for alignment scoring and features."""

    def predict_captions(self, images: ImageInput) -> List[str]:
        """Caption implied by the predicted attributes of each image."""
        from .data import format_caption

        pred = self.predict(images)
        vals = {a: [ATTRIBUTE_VALUES[a][int(i)] for i in pred[a]] for a in ATTRIBUTES}
        return [format_caption(vals["shape"][i], vals["colour"][i], vals["position"][i], vals["size"][i])
                for i in range(len(pred["shape"]))]  # fmt: skip

    def per_image(self, images: ImageInput, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Per-image correctness: ``{attribute: BoolTensor (N,)}`` for every attribute and ``"all"`` (every
        attribute right). Prompts must be in the demo caption grammar (see
        :func:`~diffusers_mixdq.demo.data.parse_caption`)."""
        pred = self.predict(images)
        if len(prompts) != len(pred["shape"]):
            raise ValueError(f"{len(prompts)} prompts for {len(pred['shape'])} images")
        target = [parse_caption(p) for p in prompts]
        out = {a: pred[a] == torch.tensor([ATTRIBUTE_VALUES[a].index(d[a]) for d in target]) for a in ATTRIBUTES}
        out["all"] = torch.stack([out[a] for a in ATTRIBUTES]).all(0)
        return out

    def aligned(self, images: ImageInput, prompts: Sequence[str]) -> torch.Tensor:
        """BoolTensor (N,): image ``i`` shows every attribute prompt ``i`` asks for."""
        return self.per_image(images, prompts)["all"]

    def score(self, images: ImageInput, prompts: Sequence[str]) -> Dict[str, float]:
        """Text-alignment accuracy of ``images`` w.r.t. their ``prompts``.

        Returns ``{attribute: accuracy}`` for every attribute, ``"all"`` (every
        attribute correct) and ``"n"`` (number of images).
        """
        result: Dict[str, float] = {a: ok.float().mean().item() for a, ok in self.per_image(images, prompts).items()}
        result["n"] = len(prompts)
        return result


def load_scorer(path: Optional[str] = None) -> Scorer:
    """Load the scorer from ``path`` (default: the bundled ``demo/scorer/``)."""
    return Scorer(load_weights(AttributeCNN, path or DEFAULT_SCORER_DIR))


def scorer_with_real_features(prompts: Sequence[str]) -> Tuple[Scorer, torch.Tensor]:
    """The bundled scorer and its features of the real (rendered) scenes of ``prompts``, the reference of
    :func:`frechet_distance`. Raises ``ValueError`` when a prompt is not a demo caption."""
    from .data import Scene, render_batch

    scorer = load_scorer()
    scenes = [Scene(**parse_caption(p)) for p in prompts]
    return scorer, scorer.features(render_batch(scenes))


class _GivenFeatures(nn.Module):
    """The identity, as torchmetrics' FID "feature extractor" for features computed already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(feats_a: Union[torch.Tensor, np.ndarray], feats_b: Union[torch.Tensor, np.ndarray]) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, computed in float64 by torchmetrics'
    ``FrechetInceptionDistance`` fed the features themselves (its feature extractor is the identity).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = (torch.as_tensor(f if isinstance(f, torch.Tensor) else np.asarray(f)).double() for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(a.shape[1]))
    metric.update(a, real=True)
    metric.update(b, real=False)
    return max(float(metric.compute()), 0.0)
