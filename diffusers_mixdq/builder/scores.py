"""Sensitivity scores on disk, resumable, and merged across the processes of a sharded build."""

from __future__ import annotations

import json
import os
from pathlib import Path


class ScoreCache:
    """Sensitivity scores on disk (JSON), written after every measurement, so an interrupted sweep resumes where it
    stopped. Keys are ``"<layer>|<width>"`` for weights and ``"<layer>|a<width>"`` for activations; the file is
    replaced atomically."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.scores: dict[str, float] = {}
        if self.path is not None:
            # this file and the parts other shards wrote beside it (``<stem>.part<i>.json``)
            for part in sorted(self.path.parent.glob(self.path.stem + "*.json")):
                self.scores.update({k: float(v) for k, v in json.loads(part.read_text()).items()})

    def shard(self, index: int) -> ScoreCache:
        """The part file shard ``index`` writes (it still reads every part, so resuming works for all shards)."""
        part = ScoreCache(None)
        part.path = self.path.with_name(f"{self.path.stem}.part{index}.json")
        part.scores = dict(self.scores)
        return part

    def get(self, key: str) -> float | None:
        return self.scores.get(key)

    def put(self, key: str, score: float) -> None:
        self.scores[key] = score
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.scores))
            os.replace(tmp, self.path)


def score_key(name: str, bits: int, kind: str = "weights") -> str:
    return f"{name}|{bits}" if kind == "weights" else f"{name}|a{bits}"



def merged(cache: ScoreCache) -> ScoreCache:
    """Every process's scores after a sharded sweep, gathered with accelerate's ``gather_object`` (a collective: every
    process calls it). Each process still writes its own part file as it measures: that is what lets an interrupted
    sharded sweep resume, and what a single-process rerun reads."""
    from accelerate.utils import gather_object

    out = ScoreCache(None)
    for scores in gather_object([cache.scores]):
        out.scores.update(scores)
    return out
