"""``mixdq eval`` and ``mixdq demo`` (registered on the ``mixdq`` app by :mod:`diffusers_mixdq.cli`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .cli import app, console, fail
from .errors import MixDQError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PLANS = REPO_ROOT / "hub_recipes" / "demo-shapes"


def _print_results(results, title: str) -> None:
    from .evaluate import format_table

    rows = format_table(results)
    table = Table(title=title, title_justify="left")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


def _write_outputs(results, out: Path, grid_columns: int | None) -> None:
    from .evaluate import save_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    grid = save_grid(results, out / "grid.png", columns=grid_columns)
    console.print(f"wrote {grid} and {out / 'results.json'}")


def _demo_scoring(prompts: list[str]):
    """The bundled scorer and its features of real rendered images for ``prompts`` (demo captions only)."""
    import torch

    from .demo.data import Scene, parse_caption, render_batch
    from .demo.scorer import load_scorer

    scorer = load_scorer()
    scenes = [Scene(**parse_caption(p)) for p in prompts]
    real = torch.as_tensor(render_batch(scenes))
    if real.shape[-1] == 3:  # (N, H, W, 3) -> (N, 3, H, W)
        real = real.permute(0, 3, 1, 2)
    return scorer, scorer.features(real.float())


@app.command("eval")
def eval_command(
    pipeline: str = typer.Argument(..., help="Pipeline directory (diffusers layout)."),
    plan: List[str] = typer.Option(..., "--plan", help="Plan to evaluate (repeatable): file, directory or repo id."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line."),
    num_prompts: int = typer.Option(32, help="Prompts to use (from --prompts, else the demo prompt set)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the demo model's)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance scale (default: the demo model's)."),
    seed: int = typer.Option(0, help="Seed of the first prompt; prompt i uses seed + i."),
    scorer: bool = typer.Option(True, help="Score text alignment with the demo scorer (demo captions only)."),
    memory: bool = typer.Option(True, help="Measure peak RSS of each variant in a fresh process."),
    out: Optional[Path] = typer.Option(None, help="Directory for grid.png and results.json."),
):
    """Size, peak memory, latency, PSNR / SSIM vs FP (and alignment, where a scorer exists) for plans."""
    from . import demo
    from .evaluate import evaluate

    try:
        if prompts_file is not None:
            prompts = [p.strip() for p in prompts_file.read_text().splitlines() if p.strip()][:num_prompts]
        else:
            prompts = demo.eval_prompts(num_prompts)
        if not prompts:
            raise MixDQError(f"No prompts in {prompts_file}.")
        score, real = None, None
        if scorer:
            try:
                score, real = _demo_scoring(prompts)
            except ValueError:
                console.print("[yellow]prompts are not demo captions: alignment is not scored[/yellow]")
        results = evaluate(
            pipeline,
            {Path(p).name if Path(p).exists() else p: p for p in plan},
            prompts,
            seed=seed,
            steps=steps or demo.NUM_INFERENCE_STEPS,
            guidance=guidance if guidance is not None else demo.GUIDANCE_SCALE,
            scorer=score,
            real_features=real,
            measure_memory=memory,
        )
    except MixDQError as e:
        fail(e)
    _print_results(results, f"{pipeline}: {len(prompts)} prompts")
    if out is not None:
        _write_outputs(results, out, None)


@app.command()
def demo(
    out: Path = typer.Option(Path("mixdq-demo"), help="Directory for grid.png and results.json."),
    plans_dir: Path = typer.Option(DEMO_PLANS, "--plans", help="Directory holding the demo plans."),
    num_prompts: int = typer.Option(48, help="Prompts for the metrics (the grid shows the first 8)."),
    memory: bool = typer.Option(True, help="Measure peak RSS of each variant in a fresh process."),
):
    """The bundled demo model in full precision and with its bundled plans: a PNG grid and a table."""
    from . import demo as demo_model
    from .evaluate import evaluate

    try:
        plans = {p.name: str(p) for p in sorted(plans_dir.iterdir()) if (p / "plan.json").is_file()} \
            if plans_dir.is_dir() else {}
        if not plans:
            raise MixDQError(
                f"No demo plans in {plans_dir} (directories holding plan.json). Run from a clone of the "
                "repository, or pass --plans DIR."
            )
        prompts = list(demo_model.DEMO_PROMPTS) + demo_model.eval_prompts(max(0, num_prompts - 8))
        scorer, real = _demo_scoring(prompts)
        results = evaluate(
            demo_model.pipeline_path(),
            plans,
            prompts,
            steps=demo_model.NUM_INFERENCE_STEPS,
            guidance=demo_model.GUIDANCE_SCALE,
            scorer=scorer,
            real_features=real,
            measure_memory=memory,
        )
    except MixDQError as e:
        fail(e)
    _print_results(results, f"mixdq demo: bundled shapes model, {len(prompts)} prompts, same seeds for all rows")
    _write_outputs(results, out, 8)


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (see hub_recipes/ and diffusers_mixdq.builder.recipe)."),
    out: Path = typer.Option(Path("mixdq-plan"), help="Output directory (receives <component>/plan.json)."),
    push: Optional[str] = typer.Option(None, help="Also publish the plan to this Hub repo (user/repo)."),
    private: Optional[bool] = typer.Option(None, "--private/--public", help="Visibility of a repo created by --push."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Resumable sensitivity cache (default: OUT/.sensitivity-cache); rerun after an interruption."
    ),
):
    """Build a plan from a recipe: calibrate, measure sensitivity, allocate widths with HiGHS, save (and push)."""
    from .builder.recipe import load_recipe, run_recipe

    try:
        from .builder.builder import is_main_process

        r = load_recipe(recipe)
        plan, path, report = run_recipe(r, out, cache_dir=None if cache_dir is None else str(cache_dir))
        if not is_main_process():
            return
        console.print(_summary(plan))
        if report is not None:
            ours = sum(report.sample_evaluations.values())
            console.print(
                f"denoiser evaluations: {report.denoiser_evaluations} calls; {ours:,} sample-evaluations vs "
                f"{report.naive_sample_evaluations:,} for the naive protocol ({report.reduction:.1f}x fewer); seconds: "
                + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items())
                + f"; chosen k = {report.chosen_k}"
            )
        console.print(f"wrote {path}")
        target = push or (r.push or {}).get("repo_id")
        if target:
            from .hub import push_plan

            is_private = private if private is not None else bool((r.push or {}).get("private", False))
            result = push_plan(out, target, private=is_private)
            console.print(f"pushed to {target}: {getattr(result, 'commit_url', None) or 'no changes'}")
    except MixDQError as e:
        fail(e)


def _summary(plan):
    from .cli import _summary_table

    return _summary_table(f"MixDQ plan for {plan.target.get('class_name')}", plan.summary().rows())
