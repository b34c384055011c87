"""``mixdq inspect``: what a plan gives each layer, its size, and how it was built."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from ..errors import MixDQError
from .app import app, console, summary_table, user_errors
from .skeleton import load_model_skeleton


def _allocation_rows(alloc: dict) -> list[tuple[str, str]]:
    rows = [("weight allocation", f"k={alloc.get('k')}, {alloc.get('status')}, average "
             f"{alloc.get('avg_bits', 0):.3f} bits, MIP gap {alloc.get('mip_gap')}, "
             f"{len(alloc.get('candidates', []))} candidates")]
    for act in alloc.get("activations") or []:
        rows.append(("activation allocation", f"{act.get('status')}, element-weighted average "
                     f"{act.get('avg_bits', 0):.3f} bits"))
    if alloc.get("activations_kept_unquantized"):
        rows.append(("inputs kept unquantized", ", ".join(alloc["activations_kept_unquantized"])))
    return rows


def _cost_rows(prov: dict) -> list[tuple[str, str]]:
    rows = []
    samples = prov.get("sample_evaluations") or {}
    if samples:
        ours = sum(v for k, v in samples.items() if k != "naive_total")
        naive = samples.get("naive_total")
        rows.append(("denoiser sample-evaluations", f"{ours:,}" + (f" (naive protocol: {naive:,})" if naive else "")))
    if prov.get("seconds"):
        rows.append(("seconds", ", ".join(f"{k} {v:.1f}" for k, v in prov["seconds"].items())))
    return rows


def provenance_rows(prov: dict) -> list[tuple[str, str]]:
    """Readable rows of a plan's provenance (what built it, on what, with which solver results and cost)."""
    rows = [("tool", str(prov.get("tool", "?")))]
    if "num_prompts" in prov:
        sha = str(prov.get("prompts_sha256"))[:12]
        rows.append(("calibration prompts", f"{prov['num_prompts']} (sha256 {sha}…)"))
    recipe = prov.get("recipe") or {}
    if recipe.get("source"):
        rows.append(("recipe", str(recipe["source"])))
    if prov.get("sensitivity_metric"):
        rows.append(("sensitivity metrics", json.dumps(prov["sensitivity_metric"])))
    if prov.get("allocation"):
        rows += _allocation_rows(prov["allocation"])
    return rows + _cost_rows(prov)


def _resolved(plan: str, model: str | None, component: str | None):
    """The plan resolved for its summary, and the model skeleton it was resolved against (None: none needed)."""
    from ..plan import resolve_plan_source

    bitplan = resolve_plan_source(plan)
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
    plan: str = typer.Argument(..., help="Plan: a .json file or a directory holding plan.json."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Model or pipeline directory to resolve the plan against (config only, no weights)."
    ),
    component: Optional[str] = typer.Option(None, help="Pipeline component holding the denoiser."),
    layers: bool = typer.Option(False, "--layers", help="Also list every layer's precision."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Summarise a plan: layers per width, average bits, estimated size vs FP16 / FP32."""
    with user_errors():
        resolved, skeleton = _resolved(plan, model, component)
        summary = resolved.summary(skeleton)
    if as_json:
        print(json.dumps({**summary.to_dict(), "provenance": resolved.provenance}, indent=2, default=str))
        return
    console.print(summary_table(_title(resolved.target), summary.rows()))
    if resolved.provenance:
        console.print(summary_table("How it was built", provenance_rows(resolved.provenance)))
    if layers:
        console.print(_layers_table(resolved))
