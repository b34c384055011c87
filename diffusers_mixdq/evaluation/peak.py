"""Peak memory of a variant, measured in a fresh Python process (``python -m diffusers_mixdq.evaluation.peak``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ..errors import MixDQError


def measure_peak_rss(path: str, plan_path: str | None, prompts: Sequence[str], generation) -> int | None:
    """Peak RSS of a fresh Python process that loads the pipeline (with the plan saved at ``plan_path``; None: full
    precision) and generates ``prompts`` in one batch as ``generation`` (a :class:`~.run.Generation`) says."""
    if not Path("/proc/self/status").exists():
        return None
    args = {"path": str(path), "plan": plan_path, "prompts": list(prompts), "generation": generation.to_dict()}
    cmd = [sys.executable, "-m", "diffusers_mixdq.evaluation.peak", json.dumps(args)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MixDQError(f"measuring memory failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _main(args_json: str) -> None:
    from diffusers.utils import logging as diffusers_logging

    from ..apply.memory import PeakMemory
    from .generation import generate, load_pipeline

    diffusers_logging.disable_progress_bar()
    args = json.loads(args_json)
    g = args["generation"]
    with PeakMemory() as peak:
        pipe = load_pipeline(args["path"], args["plan"])
        generate(pipe, args["prompts"], g["seed"], g["steps"], g["guidance"], len(args["prompts"]), g["height"],
                 g["width"], g["pipe_kwargs"])
    print(peak.peak_rss)


if __name__ == "__main__":
    _main(sys.argv[1])
