"""What every stage of one build shares: the pipeline and its denoiser, the settings (model defaults filled in),
the layers and their groups, the process state of a sharded build, and the report the stages write to."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import PlanMismatchError
from ..families import match_all
from ..plan import layer_table
from .scores import ScoreCache
from .sensitivity import layer_group
from .settings import BuildReport, BuildSettings


@dataclass
class BuildContext:
    """One build. ``candidates`` are the layers whose widths are chosen (all but the ``protected`` ones)."""

    pipe: object
    denoiser: nn.Module
    settings: BuildSettings
    state: object | None = None
    progress: bool = True
    report: BuildReport = field(default_factory=BuildReport)

    def __post_init__(self):
        s = self.settings
        self.table = layer_table(self.denoiser)
        self.groups = {n: layer_group(n, s.content_patterns) for n in self.table}
        self.protected = protected_layers(s.protected, self.table, type(self.denoiser).__name__)
        self.candidates = [n for n in self.table if n not in self.protected]

    @property
    def shard(self) -> tuple[int, int]:
        """``(index, count)`` of this process among a sharded build's processes."""
        return (self.state.process_index, self.state.num_processes) if self.state is not None else (0, 1)

    def score_cache(self, path) -> ScoreCache:
        """The score cache at ``path`` (``None``: in memory only); in a sharded build, this process's part of it
        (it reads every part; two processes replacing one file would race)."""
        cache = ScoreCache(path)
        return cache.shard(self.state.process_index) if self.state is not None and path is not None else cache


def protected_layers(patterns, table, class_name: str) -> list[str]:
    """The layers of ``table`` that the ``protected`` patterns keep in floating point, in table order. A pattern
    that matches no layer is an error (a typo would otherwise quietly quantize the layer it meant), the same for
    mixed and calibrate-only builds."""
    hits = match_all(patterns, table)
    unused = [p for p in dict.fromkeys(patterns) if not hits[p]]
    if unused:
        raise PlanMismatchError(
            f"These 'protected' patterns match no layer of {class_name}: {', '.join(map(repr, unused))} (globs "
            "match the full layer name, regexes need a 're:' prefix; `mixdq inspect PLAN --model MODEL --layers` "
            "lists the names). Fix or remove them."
        )
    protected = set().union(*hits.values())
    return [n for n in table if n in protected]
