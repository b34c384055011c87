"""The bundled demo models by name: where each one's pipeline, defaults, scorer and plans are, and its data hooks.

A model is a folder of this package (``root``) holding ``pipeline/`` (a diffusers pipeline), ``defaults.json`` (how
to generate: ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``; any other key is passed to every
pipeline call, e.g. ``max_sequence_length``) and ``scorer/``; its plans are under ``plans/<name>/``. Two modules
give the rest:

* ``data_module`` provides ``caption_pools() -> [calibration, validation, test]`` (three disjoint lists of
  captions, from a documented seed) and ``parse_caption(caption) -> dict`` (raises ``ValueError`` on a caption
  outside the model's grammar);
* ``scorer_module`` provides ``load_scorer()``, whose result has ``aligned(images, prompts)`` (one bool per image:
  everything the prompt asks for is there), ``score(images, prompts)`` (accuracies by attribute and ``"all"``)
  and ``features(images)``; and, optionally, ``scorer_with_real_features(prompts) -> (scorer, features)`` (the
  features of the rendered ground truth, for a Fréchet distance).

This module imports only the standard library (and this package's errors) at import time.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import MixDQError

_HERE = Path(__file__).resolve().parent
#: keys of ``defaults.json`` that are arguments of the generation loop, not extra pipeline keyword arguments
_LOOP_KEYS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "height": "height", "width": "width"}


@dataclass(frozen=True)
class DemoModel:
    """One bundled model (see the module docstring)."""

    name: str
    root: Path
    data_module: str
    scorer_module: str

    @property
    def pipeline_dir(self) -> Path:
        return self.root / "pipeline"

    def available(self) -> bool:
        """Whether the trained pipeline is there (a model can be registered before its weights are committed)."""
        return (self.pipeline_dir / "model_index.json").is_file()

    def pipeline_path(self) -> str:
        """Directory of the pipeline; a :class:`MixDQError` naming it when it is not there yet."""
        if not self.available():
            raise MixDQError(f"The bundled {self.name!r} model has no trained pipeline yet: {self.pipeline_dir} "
                             "holds no model_index.json.")
        return str(self.pipeline_dir)

    def defaults(self) -> dict[str, Any]:
        """``defaults.json``: steps, guidance, size and extra pipeline keyword arguments."""
        path = self.root / "defaults.json"
        if not path.is_file():
            raise MixDQError(f"The bundled {self.name!r} model has no {path}.")
        return json.loads(path.read_text())

    def generation_settings(self) -> dict[str, Any]:
        """``defaults.json`` as ``steps``, ``guidance``, ``height``, ``width`` and ``pipe_kwargs`` (the other keys)."""
        d = self.defaults()
        out: dict[str, Any] = {new: d[old] for old, new in _LOOP_KEYS.items() if old in d}
        out["pipe_kwargs"] = {k: v for k, v in d.items() if k not in _LOOP_KEYS}
        return out

    def plans_dir(self) -> Path:
        """Directory of the model's bundled plans (one sub-directory holding ``plan.json`` per plan)."""
        return _HERE / "plans" / self.name

    def data(self) -> ModuleType:
        return _hook_module(self, self.data_module)

    def scorer(self) -> ModuleType:
        return _hook_module(self, self.scorer_module)


def _hook_module(model: DemoModel, name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise MixDQError(f"The bundled {model.name!r} model needs {name}, which is not there yet.") from None


#: the bundled models by name; ``scenes`` (a PixArt DiT) is registered before its weights land
MODELS: dict[str, DemoModel] = {
    "shapes": DemoModel("shapes", _HERE, "diffusers_mixdq.demo.data", "diffusers_mixdq.demo.scorer"),
    "scenes": DemoModel("scenes", _HERE / "scenes", "diffusers_mixdq.demo.scenes_data",
                        "diffusers_mixdq.demo.scenes_scorer"),
}


def get_model(name: str) -> DemoModel:
    """The bundled model ``name``; a :class:`MixDQError` listing the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise MixDQError(f"Unknown demo model {name!r}; bundled: {', '.join(MODELS)}.") from None


def model_of_pipeline(path: str) -> DemoModel | None:
    """The bundled model whose pipeline directory is ``path``, if any."""
    try:
        resolved = Path(path).resolve()
    except OSError:
        return None
    return next((m for m in MODELS.values() if m.pipeline_dir.resolve() == resolved), None)
