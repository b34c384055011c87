"""A diffusers model built from its config alone (meta device, no weights read): what ``mixdq inspect --model``
resolves a plan against."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MixDQError


def denoiser_dir(path: str, component: str | None = None) -> Path:
    """The model directory of ``path``: itself, or for a pipeline directory (with model_index.json) its
    ``component`` folder (default: the first of ``unet`` / ``transformer`` it has)."""
    from ..families import DENOISER_COMPONENTS

    root = Path(path)
    if not (root / "model_index.json").is_file():
        return root
    index = json.loads((root / "model_index.json").read_text())
    if component is None:
        component = next((c for c in DENOISER_COMPONENTS if c in index), None)
    if component is None or component not in index:
        raise MixDQError(
            f"{path} is a pipeline without a '{component or 'unet/transformer'}' component; pass --component "
            f"with one of {sorted(k for k in index if not k.startswith('_'))}."
        )
    return root / component


def load_model_skeleton(path: str, component: str | None = None):
    """Build the model described by a diffusers model or pipeline directory on the meta device (no weights read).

    ``path`` is a model directory (with config.json naming ``_class_name``) or a pipeline directory (with
    model_index.json), in which case ``component`` (default: ``unet`` or ``transformer``) picks the denoiser.
    """
    import diffusers
    from accelerate import init_empty_weights

    config_file = denoiser_dir(path, component) / "config.json"
    if not config_file.is_file():
        raise MixDQError(f"No config.json in {config_file.parent}: pass a diffusers model or pipeline directory.")
    config = json.loads(config_file.read_text())
    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise MixDQError(f"{config_file} names model class {class_name!r}, which diffusers does not have.")
    config.pop("quantization_config", None)
    with init_empty_weights():
        return cls.from_config(config)
