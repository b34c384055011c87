"""The plan file a saved quantized model carries beside its weights.

``config.json`` keeps only a *reference* to the resolved plan, ``{"file": "mixdq_plan.json", "sha256": ...}``
(:func:`plan_reference`); the plan itself, with its tensor sidecar ``mixdq_plan.safetensors`` when it has tensors,
is written beside the weights (:func:`write_plan_file`) and checked against the hash when the model is loaded again
(:func:`read_plan_file`).

* Saving: diffusers' ``save_pretrained`` has no hook that receives the directory, so the quantizer binds a
  ``save_pretrained`` wrapper on the loaded model instance (:func:`bind_save_pretrained`) that writes the plan file
  and then calls the class's own method (which writes ``config.json`` and the weights, and uploads the folder with
  ``push_to_hub=True``; pipelines call each component's ``save_pretrained`` by attribute; ``copy.deepcopy`` rebinds
  the wrapper to the copy).
* Loading: diffusers hands the quantizer the resolved local checkpoint files (``maybe_update_loaded_keys``) before
  the model is built; the plan file is read from beside them. When they lie in the Hugging Face cache and the plan
  file was not downloaded with them (``ModelMixin.from_pretrained`` fetches only config and weights), it is fetched
  with ``huggingface_hub.hf_hub_download`` from the same repo and commit, which the cache path names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import types
from pathlib import Path
from typing import Any, Sequence

from ..errors import MixDQError
from ..plan import BitPlan, save_tensors

PLAN_FILE = "mixdq_plan.json"
SIDECAR_FILE = "mixdq_plan.safetensors"


def plan_file_text(plan: BitPlan) -> str:
    """The exact text of the plan file written for ``plan`` (what the reference's sha256 covers)."""
    data = plan.to_dict()
    if plan.tensors:
        data["tensors"] = SIDECAR_FILE
    return json.dumps(data, indent=2) + "\n"


def plan_reference(plan: BitPlan) -> dict[str, str]:
    """``{"file", "sha256"}``: what ``config.json`` keeps of the plan."""
    return {"file": PLAN_FILE, "sha256": hashlib.sha256(plan_file_text(plan).encode("utf-8")).hexdigest()}


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and "file" in value and "sha256" in value and "format" not in value


def write_plan_file(directory: str | Path, plan: BitPlan) -> Path:
    """Write ``mixdq_plan.json`` (and its safetensors sidecar, if the plan has tensors) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if plan.tensors:
        save_tensors(plan.tensors, directory / SIDECAR_FILE)
    path = directory / PLAN_FILE
    path.write_text(plan_file_text(plan), encoding="utf-8")
    return path


def bind_save_pretrained(model) -> None:
    """Make ``model.save_pretrained`` write the plan file of its ``quantization_config`` first (idempotent)."""
    original = type(model).save_pretrained

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        write_plan_file(save_directory, self.config.quantization_config.plan)
        return original(self, save_directory, *args, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)


def read_plan_file(reference: dict[str, str], checkpoint_files: Sequence[str]) -> BitPlan:
    """The plan a saved model's ``config.json`` refers to, found beside its checkpoint files and hash-checked."""
    name = Path(reference["file"]).name  # a bare file name, never a path
    path = _locate(name, checkpoint_files)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != reference["sha256"]:
        raise MixDQError(
            f"The plan file {path} does not match the sha256 its config.json records ({reference['sha256'][:12]}…, "
            f"the file has {digest[:12]}…): it was edited or comes from another save. Restore the {name} saved "
            "with these weights, or re-save the model with save_pretrained."
        )
    _fetch_sidecar(path)
    return BitPlan.load(path)


def _locate(name: str, checkpoint_files: Sequence[str]) -> Path:
    if not checkpoint_files:
        raise MixDQError(f"This quantized model refers to its plan file {name}, but diffusers gave no checkpoint "
                         "file to look beside; load it from a directory or Hub repo saved with save_pretrained.")
    folder = Path(checkpoint_files[0]).parent
    path = folder / name
    if path.is_file():
        return path
    hub = _hub_location(folder)
    if hub is not None:
        fetched = _download(hub, name)
        if fetched is not None:
            return fetched
    raise MixDQError(
        f"This quantized model's config.json refers to its plan file {name}, but there is none beside its weights "
        f"in {folder}. Copy {name} (and {SIDECAR_FILE}, if present) together with the weights, or re-save the "
        "model with save_pretrained."
    )


def _hub_location(folder: Path) -> dict[str, Any] | None:
    """Repo id, commit, subfolder and cache directory of a snapshot folder of the Hugging Face cache
    (``<cache>/models--<org>--<name>/snapshots/<commit>/<subfolder>``), else ``None``."""
    parts = folder.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return {
                "repo_id": parts[i][len("models--"):].replace("--", "/"),
                "revision": parts[i + 2],
                "subfolder": "/".join(parts[i + 3:]) or None,
                "cache_dir": str(Path(*parts[:i])),
            }
    return None


def _download(hub: dict[str, Any], name: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(filename=name, **hub))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _fetch_sidecar(path: Path) -> None:
    """Fetch the plan's tensor sidecar into the same cache snapshot when only the plan file is there."""
    sidecar = json.loads(path.read_text(encoding="utf-8")).get("tensors")
    hub = _hub_location(path.parent)
    if sidecar and hub is not None and not (path.parent / sidecar).is_file():
        _download(hub, Path(sidecar).name)
