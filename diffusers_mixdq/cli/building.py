"""``mixdq build``: a plan from a recipe (calibrate, measure, allocate, write), optionally pushed to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import THREADS_HELP, app, console, prepare_run, summary_table, user_errors


def _cost_line(report) -> str:
    """What the build cost: denoiser calls and sample-evaluations of this run, those taken from the cache, the
    method's total against the naive protocol, seconds, chosen k."""
    done = sum(report.sample_evaluations.values())
    reused = sum(report.reused_sample_evaluations.values())
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items())
    this_run = f"denoiser evaluations in this run: {report.denoiser_evaluations} calls, {done:,} sample-evaluations"
    if reused:
        this_run += (f"; taken from the cache (measured by an earlier run): {reused:,} sample-evaluations, "
                     f"{report.reused_denoiser_evaluations} calls")
    method = report.method_sample_evaluations
    return (
        f"{this_run}. The method: {method:,} sample-evaluations vs {report.naive_sample_evaluations:,} for the naive "
        f"protocol ({report.reduction:.1f}x fewer); seconds: {seconds}; chosen k = {report.chosen_k}"
    )


def _load_hint(out: Path, path: Path, components=()) -> str:
    """How to use the plan just written (``out/<component>/plan.json``, the Hub plan-repo layout)."""
    component = Path(path).parent.name
    if len(components) > 1:  # a plan set
        return (f'use it: PipelineQuantizationConfig(quant_backend="mixdq", quant_kwargs={{"plan": "{out}"}}, '
                f"components_to_quantize={list(components)}); mixdq eval PIPELINE --plan {out}")
    return (
        f'use it: MixDQConfig(plan="{out}", subfolder="{component}"); mixdq inspect {out}; '
        f"mixdq push {out} user/repo"
    )


def _push(recipe, out: Path, repo_id: str | None, private: bool | None) -> None:
    """Publish the built plan to ``repo_id`` (default: the recipe's ``push.repo_id``; none: nothing to do)."""
    settings = recipe.push or {}
    target = repo_id or settings.get("repo_id")
    if not target:
        return
    from ..hub import push_plan

    is_private = private if private is not None else bool(settings.get("private", False))
    result = push_plan(out, target, private=is_private)
    console.print(f"pushed to {target}: {getattr(result, 'commit_url', None) or 'no changes'}")


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (see hub_recipes/ and diffusers_mixdq.builder.recipe)."),
    out: Path = typer.Option(Path("mixdq-plan"), help="Output directory (receives <component>/plan.json)."),
    push: Optional[str] = typer.Option(None, help="Also publish the plan to this Hub repo (user/repo)."),
    private: Optional[bool] = typer.Option(None, "--private/--public", help="Visibility of a repo created by --push."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Resumable sensitivity cache (default: OUT/.sensitivity-cache); rerun after an interruption."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Build a plan from a recipe: calibrate, measure sensitivity, allocate widths with HiGHS, refine, save (and push).

    Defaults a recipe may override: layer inputs in int8 with a run-time range per token (activations:
    dynamic-token; activations: int8 gives static calibrated ranges) and the k pick by the best mean per-image PSNR
    (pick_objective: psnr; mse was the default before issue #14), and a refine stage after the pick that keeps a
    width change only when the pick prompts' images measurably improve (refine: {evaluations: 16}; 0: off; skipped
    with text-encoder components)."""
    with user_errors():
        from ..builder import is_main_process, load_recipe, run_recipe

        r = load_recipe(recipe)
        prepare_run(threads)
        plan, path, report = run_recipe(r, out, cache_dir=None if cache_dir is None else str(cache_dir))
        if not is_main_process():
            return
        console.print(summary_table(f"MixDQ plan for {plan.target.get('class_name')}", plan.summary().rows()))
        if report is not None:
            console.print(_cost_line(report))
        console.print(f"wrote {path}")
        for name in (c for c in r.components if c != Path(path).parent.name):
            console.print(f"wrote {out / name / 'plan.json'}")
        console.print(_load_hint(out, path, r.components))
        _push(r, out, push, private)
