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
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .data import ATTRIBUTE_VALUES, ATTRIBUTES, IMAGE_SIZE, parse_caption

ImageInput = Union[torch.Tensor, np.ndarray, Sequence["PIL.Image.Image"]]  # noqa: F821

#: Directory of the bundled scorer weights (``config.json`` + ``model.safetensors``).
DEFAULT_SCORER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scorer")


class AttributeCNN(nn.Module):
    """Small CNN with one classification head per attribute.

    Args:
        width: channels of the first conv stage (doubled after two downsamplings).
        feature_dim: size of the penultimate (feature) layer.
        num_classes: attribute name -> number of classes.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: Optional[Dict[str, int]] = None):
        super().__init__()
        num_classes = num_classes or {a: len(ATTRIBUTE_VALUES[a]) for a in ATTRIBUTES}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.ReLU(),  # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * w * (IMAGE_SIZE // 8) ** 2, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, n) for a, n in num_classes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations for images ``x`` in [-1, 1], shape (N, 3, 32, 32)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-attribute logits for images ``x`` in [-1, 1]."""
        f = self.features(x)
        return {a: head(f) for a, head in self.heads.items()}


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


class Scorer:
    """Wraps a trained :class:`AttributeCNN` for alignment scoring and features."""

    def __init__(self, model: AttributeCNN, batch_size: int = 256):
        self.model = model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, images: ImageInput) -> Dict[str, torch.Tensor]:
        """Predicted class index per attribute, each a LongTensor (N,)."""
        x = to_tensor(images) * 2 - 1
        outs: Dict[str, List[torch.Tensor]] = {a: [] for a in self.model.heads}
        for i in range(0, len(x), self.batch_size):
            for a, logits in self.model(x[i : i + self.batch_size]).items():
                outs[a].append(logits.argmax(-1))
        return {a: torch.cat(v) for a, v in outs.items()}

    def predict_captions(self, images: ImageInput) -> List[str]:
        """Caption implied by the predicted attributes of each image."""
        from .data import format_caption

        pred = self.predict(images)
        vals = {a: [ATTRIBUTE_VALUES[a][int(i)] for i in pred[a]] for a in ATTRIBUTES}
        return [format_caption(vals["shape"][i], vals["colour"][i], vals["position"][i], vals["size"][i])
                for i in range(len(pred["shape"]))]  # fmt: skip

    def score(self, images: ImageInput, prompts: Sequence[str]) -> Dict[str, float]:
        """Text-alignment accuracy of ``images`` w.r.t. their ``prompts``.

        Returns ``{attribute: accuracy}`` for every attribute, ``"all"`` (every
        attribute correct) and ``"n"`` (number of images).  Prompts must be in
        the demo caption grammar (see :func:`~diffusers_mixdq.demo.data.parse_caption`).
        """
        pred = self.predict(images)
        if len(prompts) != len(pred["shape"]):
            raise ValueError(f"{len(prompts)} prompts for {len(pred['shape'])} images")
        target = [parse_caption(p) for p in prompts]
        correct_all = torch.ones(len(prompts), dtype=torch.bool)
        result: Dict[str, float] = {}
        for a in ATTRIBUTES:
            t = torch.tensor([ATTRIBUTE_VALUES[a].index(d[a]) for d in target])
            ok = pred[a] == t
            correct_all &= ok
            result[a] = ok.float().mean().item()
        result["all"] = correct_all.float().mean().item()
        result["n"] = len(prompts)
        return result

    @torch.no_grad()
    def features(self, images: ImageInput) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim), float32, for :func:`frechet_distance`."""
        x = to_tensor(images) * 2 - 1
        return torch.cat([self.model.features(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])


def load_scorer(path: Optional[str] = None) -> Scorer:
    """Load the scorer from ``path`` (default: the bundled ``demo/scorer/``)."""
    from safetensors.torch import load_file

    path = path or DEFAULT_SCORER_DIR
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = AttributeCNN(width=cfg["width"], feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"])
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return Scorer(model)


def frechet_distance(feats_a: Union[torch.Tensor, np.ndarray], feats_b: Union[torch.Tensor, np.ndarray]) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, computed in
    float64 without scipy: ``tr((S_a S_b)^{1/2}) = tr((A S_b A)^{1/2})`` with
    ``A = S_a^{1/2}``, and both square roots of symmetric PSD matrices are
    taken by eigendecomposition (negative eigenvalues from round-off clipped).
    """
    a = torch.as_tensor(np.asarray(feats_a) if not isinstance(feats_a, torch.Tensor) else feats_a).double()
    b = torch.as_tensor(np.asarray(feats_b) if not isinstance(feats_b, torch.Tensor) else feats_b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        m = (m + m.T) / 2
        vals, vecs = torch.linalg.eigh(m)
        return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

    root_a = _sqrtm_psd(cov_a)
    mid = root_a @ cov_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_covmean
    return float(fd.clamp_min(0))
