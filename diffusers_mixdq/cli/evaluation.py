"""``mixdq eval`` (plans on any pipeline) and ``mixdq demo`` (the bundled demo model with its bundled plans)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import MixDQError
from .app import app, console, user_errors


def _print_results(results, title: str) -> None:
    from ..evaluate import format_table

    rows = format_table(results)
    table = Table(title=title, title_justify="left")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


def _write_outputs(results, out: Path, grid_columns: int | None) -> None:
    from ..evaluate import save_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    grid = save_grid(results, out / "grid.png", columns=grid_columns)
    console.print(f"wrote {grid} and {out / 'results.json'}")


def _read_prompts(prompts_file: Path | None, num_prompts: int) -> list[str]:
    """The first ``num_prompts`` prompts of ``prompts_file`` (one per line), else of the demo prompt set."""
    from .. import demo

    if prompts_file is None:
        return demo.eval_prompts(num_prompts)
    prompts = [p.strip() for p in prompts_file.read_text().splitlines() if p.strip()][:num_prompts]
    if not prompts:
        raise MixDQError(f"No prompts in {prompts_file}.")
    return prompts


def _scoring(prompts: list[str], required: bool):
    """The demo scorer and the features of the real scenes of ``prompts``; ``(None, None)`` when the prompts are
    not demo captions and scoring is not ``required``."""
    from ..demo.scorer import scorer_with_real_features

    try:
        return scorer_with_real_features(prompts)
    except ValueError:
        if required:
            raise
        console.print("[yellow]prompts are not demo captions: alignment is not scored[/yellow]")
        return None, None


def _evaluate(pipeline: str, plans: dict, prompts: list[str], scoring, **settings):
    from ..evaluate import evaluate

    scorer, real_features = scoring
    return evaluate(pipeline, plans, prompts, scorer=scorer, real_features=real_features, **settings)


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
    from .. import demo

    with user_errors():
        prompts = _read_prompts(prompts_file, num_prompts)
        results = _evaluate(
            pipeline, {Path(p).name if Path(p).exists() else p: p for p in plan}, prompts,
            _scoring(prompts, required=False) if scorer else (None, None), seed=seed,
            steps=steps or demo.NUM_INFERENCE_STEPS,
            guidance=guidance if guidance is not None else demo.GUIDANCE_SCALE, measure_memory=memory,
        )
    _print_results(results, f"{pipeline}: {len(prompts)} prompts")
    if out is not None:
        _write_outputs(results, out, None)


@app.command()
def demo(
    out: Path = typer.Option(Path("mixdq-demo"), help="Directory for grid.png and results.json."),
    plans_dir: Optional[Path] = typer.Option(
        None, "--plans", help="Directory holding the plans to show (default: the demo model's bundled plans)."
    ),
    num_prompts: int = typer.Option(48, help="Prompts for the metrics (the grid shows the first 8)."),
    memory: bool = typer.Option(True, help="Measure peak RSS of each variant in a fresh process."),
):
    """The bundled demo model in full precision and with its bundled plans: a PNG grid and a table."""
    from .. import demo as demo_model

    with user_errors():
        plans_dir = plans_dir or demo_model.plans_dir()
        plans = {name: str(path) for name, path in demo_model.plans_in(plans_dir).items()}
        if not plans:
            raise MixDQError(f"No demo plans in {plans_dir} (directories holding plan.json); pass --plans DIR.")
        prompts = list(demo_model.DEMO_PROMPTS) + demo_model.eval_prompts(max(0, num_prompts - 8))
        results = _evaluate(
            demo_model.pipeline_path(), plans, prompts, _scoring(prompts, required=True),
            steps=demo_model.NUM_INFERENCE_STEPS, guidance=demo_model.GUIDANCE_SCALE, measure_memory=memory,
        )
    _print_results(results, f"mixdq demo: bundled shapes model, {len(prompts)} prompts, same seeds for all rows")
    _write_outputs(results, out, 8)
