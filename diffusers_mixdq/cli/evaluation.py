"""``mixdq eval`` (plans on any pipeline) and ``mixdq demo`` (the bundled demo models with their bundled plans)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.table import Table
from typer.core import TyperCommand

from ..errors import MixDQError
from .app import THREADS_HELP, app, console, prepare_run, user_errors

JSON_HELP = ("Write a JSON list, one object per variant with exactly: name, avg_weight_bits, denoiser_bytes, "
             "psnr_median_db, psnr_p10_db, diverged, ssim, aligned (%), aligned_ci (a lo, hi pair, %), "
             "seconds_per_image, text_encoder_bytes (the pipeline's text encoders) (null where a metric does not apply; an infinite PSNR is written as 1e999).")


def _print_results(results, summaries, title: str) -> None:
    from ..evaluation import format_table

    rows = format_table(results, summaries)
    table = Table(title=title, title_justify="left")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "variant" else "right",
                         no_wrap=col == "variant" or col.startswith("aligned"))
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


def _write_outputs(results, summaries, out: Path, grid_columns: int | None) -> None:
    from ..evaluation import dumps, save_grid

    out.mkdir(parents=True, exist_ok=True)
    rows = [{**r.to_dict(), "summary": s} for r, s in zip(results, summaries)]
    (out / "results.json").write_text(dumps(rows))
    grid = save_grid(results, out / "grid.png", columns=grid_columns)
    console.print(f"wrote {grid} and {out / 'results.json'}")


def _read_prompts(prompts_file: Path | None, model: str, split: str, num_prompts: int, seed: int) -> list[str]:
    """The first ``num_prompts`` prompts of ``prompts_file`` (one per line), else of the model's ``split`` set."""
    from .. import demo

    if prompts_file is None:
        return demo.prompt_set(model, split, num_prompts, seed)
    prompts = [p.strip() for p in prompts_file.read_text().splitlines() if p.strip()][:num_prompts]
    if not prompts:
        raise MixDQError(f"No prompts in {prompts_file}.")
    return prompts


def _scoring(model, prompts: list[str], required: bool):
    """The model's scorer and the features of the rendered ground truth of ``prompts`` (None where the scorer
    module has no renderer); ``(None, None)`` when the prompts are not the model's captions and scoring is not
    ``required``."""
    from ..demo.prompt_sets import is_caption

    if not all(is_caption(model.name, p) for p in prompts):
        if required:
            raise MixDQError(f"prompts are not captions of the {model.name!r} demo model: alignment cannot be scored")
        console.print(f"[yellow]prompts are not {model.name} captions: alignment is not scored[/yellow]")
        return None, None
    module = model.scorer()
    if hasattr(module, "scorer_with_real_features"):
        return module.scorer_with_real_features(prompts)
    return module.load_scorer(), None


def _run(pipeline: str, plans: dict, prompts: list[str], scoring, generation, memory: bool, resamples: int):
    """Evaluate, then summarize every variant (the alignment intervals seeded with the run's seed)."""
    from ..evaluation import evaluate, summary

    scorer, real_features = scoring
    results = evaluate(pipeline, plans, prompts, generation=generation, scorer=scorer, real_features=real_features,
                       measure_memory=memory)
    return results, [summary(r, resamples=resamples, seed=generation.seed) for r in results]


def _plan_sources(model, plans: list[str], subfolder: str | None = None) -> dict:
    """``{name: plan or source}``: a local path (its only component folder, or ``subfolder``), else the model's
    bundled plan of that name, else a repo id (in ``subfolder`` when given)."""
    from .. import demo
    from .plan_paths import load_plan_argument

    from ..plan.components import component_plans

    out = {}
    for p in plans:
        bundled = None if Path(p).exists() or subfolder else demo.bundled_plan(model.name, p)
        name = Path(p).name if Path(p).exists() else p
        # a plan set: each component quantized with its own plan (a local one may hold a single component folder,
        # e.g. text_encoder/ alone; a Hub repo needs two, else its one folder is the plan)
        if bundled is None and not subfolder and component_plans(p, minimum=1 if Path(p).is_dir() else 2):
            out[name] = p
            continue
        out[name] = str(bundled) if bundled else load_plan_argument(p, subfolder)[0]
    return out


def _generation(model, own_pipeline: bool, seed: int, steps: int | None, guidance: float | None, batch_size: int):
    """How to generate: the model's defaults (size and extra pipeline arguments only on its own pipeline)."""
    from ..evaluation import Generation

    d = model.generation_settings()
    if not own_pipeline:
        d = {k: v for k, v in d.items() if k in ("steps", "guidance")}
    d.update({k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None})
    return Generation(seed=seed, batch_size=batch_size, **d)


class _PairsCommand(TyperCommand):
    """A command whose ``--compare A B`` may be given several times (typer keeps only the last of a two-value
    option): every pair is taken out of the arguments before parsing and left in ``ctx.meta["compare"]``."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        pairs, rest, i = [], [], 0
        while i < len(args):
            if args[i] != "--compare":
                rest.append(args[i])
                i += 1
                continue
            names = args[i + 1:i + 3]
            if len(names) < 2 or any(n.startswith("--") for n in names):
                raise typer.BadParameter("takes two variant names, e.g. --compare w4a8-mixed FP32.", ctx=ctx,
                                         param_hint="'--compare'")
            pairs.append((names[0], names[1]))
            i += 3
        ctx.meta["compare"] = pairs
        return super().parse_args(ctx, rest)


def _check_pairs(pairs: list[tuple[str, str]], variants: list[str]) -> None:
    """Every ``--compare`` name is a variant that will be evaluated (checked before generating anything)."""
    missing = sorted({n for pair in pairs for n in pair if n not in variants})
    if missing:
        raise MixDQError(f"--compare: no variant {', '.join(map(repr, missing))}; variants: {', '.join(variants)}.")


def _print_comparison(results, names: tuple[str, str], resamples: int, seed: int) -> None:
    from ..evaluation import compare, describe

    by_name = {r.name: r for r in results}
    for line in describe(compare(by_name[names[0]], by_name[names[1]], resamples=resamples, seed=seed)):
        console.print(line, highlight=False)


def _model_for(pipeline: str | None, model: str | None):
    from .. import demo

    if model is not None:
        return demo.get_model(model)
    return (demo.model_of_pipeline(pipeline) if pipeline else None) or demo.get_model("shapes")


@app.command("eval", cls=_PairsCommand)
def eval_command(
    ctx: typer.Context,
    pipeline: Optional[str] = typer.Argument(None, help="Pipeline directory (default: the --model's bundled one)."),
    plan: List[str] = typer.Option(..., "--plan", help="Plan (repeatable): file, directory, repo id, or the name of "
                                   "a bundled plan of the model."),
    model: Optional[str] = typer.Option(None, help="Bundled model whose prompt sets, scorer and defaults to use "
                                        "(default: the one PIPELINE is, else shapes)."),
    split: str = typer.Option("test", help="Prompt set of the model: test (held out), validation or calibration."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line."),
    num_prompts: int = typer.Option(64, help="Prompts to use (from --prompts, else the model's prompt set)."),
    seed: int = typer.Option(0, help="Chooses the prompt subset and the image seeds (prompt i: seed + i)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance scale (default: the model's)."),
    batch_size: int = typer.Option(16, help="Prompts per pipeline call."),
    scorer: bool = typer.Option(True, help="Score text alignment with the model's scorer (its captions only)."),
    memory: bool = typer.Option(True, help="Measure peak RSS of each variant in a fresh process."),
    compare: Optional[Tuple[str, str]] = typer.Option(None, help="Paired tests between two variants (e.g. --compare "
                                                      "w4a8-mixed w4a8-uniform; FP32 is the reference); repeat "
                                                      "for more pairs."),
    resamples: int = typer.Option(2000, help="Bootstrap resamples of the alignment intervals."),
    json_path: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
    out: Optional[Path] = typer.Option(None, help="Directory for grid.png and results.json."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder", help="Component folder of each --plan (unet, "
                                            "transformer); default: the only one there is."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Per variant: size, weight bits, peak memory, seconds per image, per-image PSNR to full precision (median,
    10th percentile, diverged images), SSIM and, with a scorer, alignment with a 95% bootstrap interval."""
    from ..evaluation import write_json

    prepare_run(threads)
    with user_errors():
        m = _model_for(pipeline, model)
        own = pipeline is None or m.pipeline_dir.resolve() == Path(pipeline).resolve()
        pipeline = pipeline or m.pipeline_path()
        prompts = _read_prompts(prompts_file, m.name, split, num_prompts, seed)
        gen = _generation(m, own, seed, steps, guidance, batch_size)
        sources = _plan_sources(m, plan, subfolder)
        pairs = ctx.meta.get("compare", [])
        _check_pairs(pairs, ["FP32", *sources])
        results, summaries = _run(pipeline, sources, prompts,
                                  _scoring(m, prompts, required=False) if scorer else (None, None), gen, memory,
                                  resamples)
        _print_results(results, summaries, f"{pipeline}: {len(prompts)} prompts"
                       + ("" if prompts_file else f" of the {m.name} {split} set, seed {seed}"))
        for pair in pairs:
            _print_comparison(results, pair, resamples, seed)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, summaries)}")
    if out is not None:
        _write_outputs(results, summaries, out, None)


def _demo_one(model, plans_dir: Path | None, num_prompts: int, seed: int, memory: bool, out: Path):
    from .. import demo as demo_model

    plans_dir = plans_dir or model.plans_dir()
    found = {**demo_model.plans_in(plans_dir), **demo_model.plan_sets_in(plans_dir)}
    plans = {name: str(path) for name, path in found.items()}
    if not plans:
        raise MixDQError(f"No demo plans in {plans_dir} (directories holding plan.json); pass --plans DIR.")
    prompts = demo_model.prompt_set(model.name, "test", num_prompts, seed)
    gen = _generation(model, True, seed, None, None, 16)
    results, summaries = _run(model.pipeline_path(), plans, prompts, _scoring(model, prompts, required=True), gen,
                              memory, 2000)
    _print_results(results, summaries, f"mixdq demo: bundled {model.name} model, {len(prompts)} test prompts "
                   f"(seed {seed}), same seeds for all rows")
    _write_outputs(results, summaries, out / model.name, 8)
    return [{**s, "name": f"{model.name}/{s['name']}"} for s in summaries]


@app.command()
def demo(
    model: List[str] = typer.Option([], "--model", help="Bundled model to show (repeatable; default: every bundled "
                                    "model whose pipeline is there)."),
    out: Path = typer.Option(Path("mixdq-demo"), help="Directory for <model>/grid.png and <model>/results.json."),
    plans_dir: Optional[Path] = typer.Option(
        None, "--plans", help="Directory holding the plans to show (one model only; default: its bundled plans)."
    ),
    num_prompts: int = typer.Option(48, help="Test prompts for the metrics (the grid shows the first 8)."),
    seed: int = typer.Option(0, help="Chooses the test prompts and the image seeds (prompt i: seed + i)."),
    memory: bool = typer.Option(True, help="Measure peak RSS of each variant in a fresh process."),
    json_path: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP + " Names are <model>/<variant>."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """The bundled demo models in full precision and with their bundled plans, on held-out test prompts: a PNG grid
    and a table per model."""
    from .. import demo as demo_model
    from ..evaluation import write_json

    prepare_run(threads)
    with user_errors():
        names = list(model) or demo_model.available_models()
        if plans_dir is not None and len(names) != 1:
            raise MixDQError("--plans needs exactly one --model.")
        rows = []
        for name in names:
            rows += _demo_one(demo_model.get_model(name), plans_dir, num_prompts, seed, memory, out)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, rows)}")
