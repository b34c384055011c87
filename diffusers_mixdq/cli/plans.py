"""``mixdq inspect``: what a plan gives each layer, its size, and how it was built."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from ..errors import MixDQError
from .app import app, console, summary_table, user_errors
from .plan_paths import load_plan_argument
from .skeleton import load_model_skeleton


def _resolved(bitplan, model: str | None, component: str | None):
    """The plan resolved for its summary, and the model skeleton it was resolved against (None: none needed)."""
    skeleton = load_model_skeleton(model, component) if model else None
    if skeleton is None:
        if not bitplan.is_resolved:
            raise MixDQError("This plan uses rules/defaults, so its summary depends on the model: add --model PATH.")
        return bitplan, None
    return bitplan.resolve(skeleton, strict=False), skeleton


def _layers_table(resolved) -> Table:
    table = Table(title="Layers", title_justify="left")
    for col in ("layer", "type", "shape", "weights", "activations", "range"):
        table.add_column(col)
    manifest = resolved.manifest()
    for name, spec in resolved.layer_specs().items():
        info = manifest[name]
        rng = "" if spec.activations == "none" else str(spec.act_range)
        table.add_row(name, info.type, "x".join(map(str, info.shape)), spec.weights, spec.activations, rng)
    return table


def _title(target: dict) -> str:
    title = f"MixDQ plan for {target.get('class_name', '?')}"
    return title + (f" ({target['base_model']})" if target.get("base_model") else "")


@app.command("inspect")
def inspect_command(
    plan: str = typer.Argument(
        ..., help="Plan: a .json file, a directory holding plan.json or component folders (unet/plan.json), or a "
        "Hub repo id."
    ),
    subfolder: Optional[str] = typer.Option(
        None, "--subfolder", help="Component folder of the plan (unet, transformer); default: the only one there is."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="Model or pipeline directory to resolve the plan against (config only, no weights)."
    ),
    component: Optional[str] = typer.Option(None, help="Pipeline component holding the denoiser."),
    layers: bool = typer.Option(False, "--layers", help="Also list every layer's precision."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Summarise a plan: layers per width, average bits, estimated size vs FP16 / FP32."""
    with user_errors():
        bitplan, detected = load_plan_argument(plan, subfolder)
        resolved, skeleton = _resolved(bitplan, model, component or detected or subfolder)
        summary = resolved.summary(skeleton)
    if as_json:
        print(json.dumps({**summary.to_dict(), "provenance": resolved.provenance}, indent=2, default=str))
        return
    if detected:
        console.print(f"{plan}: the plan of its only component folder, {detected}/")
    console.print(summary_table(_title(resolved.target), summary.rows()))
    if resolved.provenance:
        from ..hub.provenance import provenance_rows

        console.print(summary_table("How it was built", provenance_rows(resolved.provenance, resolved.target)))
    if layers:
        console.print(_layers_table(resolved))
