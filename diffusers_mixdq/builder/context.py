"""What every stage of one build shares: the pipeline and its denoiser, the settings (model defaults filled in),
the layers and their groups, the process state of a sharded build, and the report the stages write to."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..families import matches
from ..plan import layer_table
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
        self.protected = [n for n in self.table if any(matches(p, n) for p in s.protected)]
        self.candidates = [n for n in self.table if n not in self.protected]

    @property
    def shard(self) -> tuple[int, int]:
        """``(index, count)`` of this process among a sharded build's processes."""
        return (self.state.process_index, self.state.num_processes) if self.state is not None else (0, 1)
