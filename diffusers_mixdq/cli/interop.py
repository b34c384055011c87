"""``mixdq import mixdq`` / ``mixdq export mixdq``: the MixDQ authors' published ``{layer: bits}`` YAML maps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, summary_table, user_errors

import_app = typer.Typer(help="Turn other tools' plans into diffusers-mixdq plans.", no_args_is_help=True)
export_app = typer.Typer(help="Write diffusers-mixdq plans in other tools' formats.", no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")


@import_app.command("mixdq")
def import_mixdq(
    weights: str = typer.Option(..., "--weights", help="MixDQ weight map (YAML file or http(s) URL): layer -> 2/4/8."),
    acts: Optional[str] = typer.Option(None, "--acts", help="MixDQ activation map (layer -> 4/8); absent: FP inputs."),
    out: Path = typer.Option(..., "--out", help="Directory that receives plan.json."),
    base: Optional[str] = typer.Option(
        None, "--base", help="Model or pipeline directory to check the plan against and fingerprint it for."
    ),
    component: Optional[str] = typer.Option(None, "--component", help="With a pipeline --base: its denoiser."),
    act_range: str = typer.Option("dynamic", "--act-range", help="'dynamic' or a number (static absolute max)."),
    prefix: str = typer.Option("model.", "--prefix", help="Prefix the maps put before diffusers' layer names."),
    keep_fp: Optional[str] = typer.Option(
        None, "--keep-fp", help="Layers kept fully in floating point: MixDQ's act-protect .pt or a YAML list."
    ),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Model id to record as target.base_model."),
    note: list[str] = typer.Option([], "--provenance", help="KEY=VALUE recorded in the plan's provenance (repeat)."),
):
    """Import a plan published as MixDQ's YAML maps (e.g. weight_3.66.yaml + act_7.77.yaml)."""
    from ..plan import BitPlan
    from .skeleton import load_model_skeleton

    with user_errors():
        plan = BitPlan.from_mixdq(weights, acts, act_range=_act_range(act_range), prefix=prefix, keep_fp=keep_fp,
                                  provenance=_pairs(note))
        if base is not None:
            plan = plan.resolve(load_model_skeleton(base, component))
        if base_model is not None:
            plan.target["base_model"] = base_model
        path = plan.save(out)
        rows = plan.summary().rows() if plan.is_resolved else [("layers", str(len(plan.layers)))]
    console.print(summary_table("Imported MixDQ plan", rows))
    console.print(f"wrote {path}")


@export_app.command("mixdq")
def export_mixdq(
    plan: str = typer.Argument(..., help="Plan directory (plan.json) or .json file."),
    weights: Path = typer.Option(..., "--weights", help="Where to write the weight map (YAML)."),
    acts: Optional[Path] = typer.Option(None, "--acts", help="Where to write the activation map (YAML)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model directory to resolve a rule-based plan on."),
    component: Optional[str] = typer.Option(None, "--component", help="With a pipeline --model: its denoiser."),
    prefix: str = typer.Option("model.", "--prefix", help="Prefix to put before diffusers' layer names."),
    keep_fp: Optional[Path] = typer.Option(
        None, "--keep-fp", help="Where to write the layers kept fully in FP (YAML list; their widths go in the maps)."
    ),
):
    """Export a plan as MixDQ's YAML maps (layer -> bits)."""
    from ..plan import BitPlan
    from .skeleton import load_model_skeleton

    with user_errors():
        loaded = BitPlan.load(plan)
        skeleton = load_model_skeleton(model, component) if model is not None else None
        w, a = loaded.to_mixdq(model=skeleton, weights=weights, activations=acts, prefix=prefix, keep_fp=keep_fp)
    console.print(f"wrote {weights} ({len(w)} layers)" + (f" and {acts} ({len(a)} layers)" if acts else ""))


def _pairs(items: list[str]) -> dict[str, str]:
    from ..errors import MixDQError

    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        raise MixDQError(f"--provenance takes KEY=VALUE, got {bad[0]!r}.")
    return dict(item.split("=", 1) for item in items)


def _act_range(text: str) -> float | str:
    if text == "dynamic":
        return text
    try:
        return float(text)
    except ValueError:
        from ..errors import MixDQError

        raise MixDQError(f"--act-range must be 'dynamic' or a number, got {text!r}.") from None
