"""``mixdq attach-bos``: a copy of a plan carrying the BOS hidden state of a pipeline's text encoder(s), so its
cross-attention K/V layers are BOS-aware when it is applied (``diffusers_mixdq.bos.attach_bos`` from the command
line). Only the text side of the pipeline is loaded: its denoiser and VAE are left out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, summary_table, user_errors

#: pipeline components that encoding a prompt does not need (not loaded)
_NOT_NEEDED = ("unet", "transformer", "vae", "safety_checker", "feature_extractor", "image_encoder")


def _text_pipeline(pipeline: str, revision: str | None):
    """``pipeline`` loaded without the components that do not encode prompts."""
    from diffusers import DiffusionPipeline

    from ..errors import MixDQError

    try:
        index = DiffusionPipeline.load_config(pipeline, revision=revision)
        skip = {name: None for name in _NOT_NEEDED if name in index}
        return DiffusionPipeline.from_pretrained(pipeline, revision=revision, **skip)
    except (OSError, ValueError, TypeError) as e:
        raise MixDQError(f"Could not load the text encoder(s) of pipeline '{pipeline}': {e}") from None


@app.command("attach-bos")
def attach_bos_command(
    plan: str = typer.Argument(..., help="Plan: a .json file or a directory holding plan.json."),
    pipeline: str = typer.Option(..., "--pipeline", help="Pipeline directory or Hub id the plan will run in."),
    out: Path = typer.Option(..., "--out", help="Directory that receives plan.json and its safetensors sidecar."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Revision of a Hub --pipeline."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder", help="Component folder of PLAN (unet, transformer)."),
):
    """Attach the BOS hidden state of PIPELINE's text encoder(s) to a plan (MixDQ's BOS-aware K/V layers)."""
    from ..bos import attach_bos, bos_hidden_state
    from .plan_paths import load_plan_argument

    with user_errors():
        loaded, _ = load_plan_argument(plan, subfolder)
        state = bos_hidden_state(_text_pipeline(pipeline, revision))
        path = attach_bos(loaded, state, text_encoder=pipeline).save(out)
    rows = [("text encoder", pipeline), ("BOS state", f"{state.numel()} values, norm {float(state.norm()):.4g}")]
    console.print(summary_table("BOS state attached", rows))
    console.print(f"wrote {path}")
