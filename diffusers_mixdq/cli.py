"""The ``mixdq`` command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MixDQError

app = typer.Typer(
    help="Mixed-precision (MixDQ) quantization plans for diffusers models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# wide enough for the evaluation tables even when the output is not a terminal
console = Console(width=max(140, shutil.get_terminal_size((140, 24)).columns))


def fail(error: Exception) -> None:
    """Report a user-facing error and exit with status 2 (no traceback)."""
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2) from None


@app.callback()
def _root() -> None:
    """Mixed-precision (MixDQ) quantization plans for diffusers models."""


def load_model_skeleton(path: str, component: str | None = None):
    """Build the model described by a diffusers model or pipeline directory on the meta device (no weights read).

    ``path`` is a model directory (with config.json naming ``_class_name``) or a pipeline directory (with
    model_index.json), in which case ``component`` (default: ``unet`` or ``transformer``) picks the denoiser.
    """
    import diffusers
    from accelerate import init_empty_weights

    root = Path(path)
    if (root / "model_index.json").is_file():
        index = json.loads((root / "model_index.json").read_text())
        if component is None:
            component = next((c for c in ("unet", "transformer") if c in index), None)
        if component is None or component not in index:
            raise MixDQError(
                f"{path} is a pipeline without a '{component or 'unet/transformer'}' component; pass --component "
                f"with one of {sorted(k for k in index if not k.startswith('_'))}."
            )
        root = root / component
    config_file = root / "config.json"
    if not config_file.is_file():
        raise MixDQError(f"No config.json in {root}: pass a diffusers model or pipeline directory.")
    config = json.loads(config_file.read_text())
    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise MixDQError(f"{config_file} names model class {class_name!r}, which diffusers does not have.")
    config.pop("quantization_config", None)
    with init_empty_weights():
        return cls.from_config(config)


def _summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    return table


def provenance_rows(prov: dict) -> list[tuple[str, str]]:
    """Readable rows of a plan's provenance (what built it, on what, with which solver results and cost)."""
    rows = [("tool", str(prov.get("tool", "?")))]
    if "num_prompts" in prov:
        rows.append(("calibration prompts", f"{prov['num_prompts']} (sha256 {str(prov.get('prompts_sha256'))[:12]}…)"))
    recipe = prov.get("recipe") or {}
    if recipe.get("source"):
        rows.append(("recipe", str(recipe["source"])))
    if prov.get("sensitivity_metric"):
        rows.append(("sensitivity metrics", json.dumps(prov["sensitivity_metric"])))
    alloc = prov.get("allocation") or {}
    if alloc:
        rows.append(("weight allocation", f"k={alloc.get('k')}, {alloc.get('status')}, average "
                     f"{alloc.get('avg_bits', 0):.3f} bits, MIP gap {alloc.get('mip_gap')}, "
                     f"{len(alloc.get('candidates', []))} candidates"))
        for act in alloc.get("activations") or []:
            rows.append(("activation allocation", f"{act.get('status')}, element-weighted average "
                         f"{act.get('avg_bits', 0):.3f} bits"))
        if alloc.get("activations_kept_unquantized"):
            rows.append(("inputs kept unquantized", ", ".join(alloc["activations_kept_unquantized"])))
    samples = prov.get("sample_evaluations") or {}
    if samples:
        ours = sum(v for k, v in samples.items() if k != "naive_total")
        naive = samples.get("naive_total")
        rows.append(("denoiser sample-evaluations", f"{ours:,}" + (f" (naive protocol: {naive:,})" if naive else "")))
    if prov.get("seconds"):
        rows.append(("seconds", ", ".join(f"{k} {v:.1f}" for k, v in prov["seconds"].items())))
    return rows


@app.command()
def inspect(
    plan: str = typer.Argument(..., help="Plan: a .json file or a directory holding plan.json."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Model or pipeline directory to resolve the plan against (config only, no weights)."
    ),
    component: Optional[str] = typer.Option(None, help="Pipeline component holding the denoiser."),
    layers: bool = typer.Option(False, "--layers", help="Also list every layer's precision."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Summarise a plan: layers per width, average bits, estimated size vs FP16 / FP32."""
    from .plan import resolve_plan_source

    try:
        bitplan = resolve_plan_source(plan)
        skeleton = load_model_skeleton(model, component) if model else None
        resolved = bitplan if skeleton is None and bitplan.is_resolved else None
        if resolved is None:
            if skeleton is None:
                raise MixDQError(
                    "This plan uses rules/defaults, so its summary depends on the model: add --model PATH."
                )
            resolved = bitplan.resolve(skeleton, strict=False)
        summary = resolved.summary(skeleton)
    except MixDQError as e:
        fail(e)
    if as_json:
        print(json.dumps({**summary.to_dict(), "provenance": resolved.provenance}, indent=2, default=str))
        return
    target = resolved.target
    title = f"MixDQ plan for {target.get('class_name', '?')}"
    if target.get("base_model"):
        title += f" ({target['base_model']})"
    console.print(_summary_table(title, summary.rows()))
    if resolved.provenance:
        console.print(_summary_table("How it was built", provenance_rows(resolved.provenance)))
    if layers:
        table = Table(title="Layers", title_justify="left")
        for col in ("layer", "type", "shape", "weights", "activations", "range"):
            table.add_column(col)
        manifest = resolved.manifest()
        for name, spec in resolved.layer_specs().items():
            info = manifest[name]
            rng = "" if spec.activations == "none" else str(spec.act_range)
            table.add_row(name, info.type, "x".join(map(str, info.shape)), spec.weights, spec.activations, rng)
        console.print(table)


from . import cli_eval as _cli_eval  # noqa: E402,F401  (registers `mixdq eval` and `mixdq demo`)


@app.command()
def push(
    plan_dir: str = typer.Argument(
        ...,
        help="Plan directory (plan.json at its root and/or in component folders such as unet/) or a plan .json file.",
    ),
    repo_id: str = typer.Argument(..., help="Hub model repository, namespace/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Branch to commit to (created from main if missing). Default: main."
    ),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message."),
    component: Optional[str] = typer.Option(
        None, "--component", help="Publish a root-level plan in this component's folder instead (e.g. unet)."
    ),
):
    """Publish plans and a generated model card (README.md) to the Hugging Face Hub, in one commit.

    Authentication: `hf auth login` or the HF_TOKEN environment variable.
    """
    from .hub import push_plan

    try:
        info = push_plan(
            plan_dir,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            component=component,
        )
    except MixDQError as e:
        fail(e)
    console.print(f"pushed {plan_dir} to {repo_id}: commit {info.oid}")
    console.print(info.commit_url)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
