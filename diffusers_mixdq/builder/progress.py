"""Progress bars of the build (calibration, sensitivity sweeps) whose ETA means something.

The first measured job of a sweep pays one-time costs: optimum-quanto's kernels are compiled on the first int4 /
int2 use (tens of seconds on a CPU), allocators and caches warm up. tqdm's own estimate divides by a rate that
includes that job, so a run of minutes first read "2:14:29". :class:`SteadyRateBar` times the first job alone and
leaves it out of the rate (the ETA shows ``?`` until a second job is done); scores taken from the cache count as
done from the start and never enter the rate either.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from tqdm.auto import tqdm


class SteadyRateBar(tqdm):
    """A tqdm bar whose rate (and so its ETA) counts only the steps after the first one it saw completed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("smoothing", 0)  # the average rate since the warm-up, not a moving average
        self._warm_n: float | None = None
        self._warm_elapsed = 0.0
        self._note = ""
        super().__init__(*args, **kwargs)

    def update(self, n: float = 1) -> bool | None:
        if not self.disable:
            if self._warm_n is None:
                self._warm_n = self.n + n
                self._warm_elapsed = self._time() - self.start_t
                self._note = getattr(self, "postfix", None) or ""
                self.set_postfix_str(f"first step {self._warm_elapsed:.1f}s: one-time setup, not in the ETA",
                                     refresh=False)
            elif self.n + n > self._warm_n and self.postfix != self._note:
                self.set_postfix_str(self._note, refresh=False)
        return super().update(n)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        if self._warm_n is None or d["n"] <= self._warm_n:
            d["rate"], d["initial"] = None, d["n"]  # no steady step timed yet: rate and ETA unknown ("?")
        else:
            d["rate"] = (d["n"] - self._warm_n) / max(d["elapsed"] - self._warm_elapsed, 1e-9)
        return d


def sweep_bar(desc: str, total: int, cached: int, enabled: bool) -> SteadyRateBar:
    """The bar of a sensitivity sweep of ``total`` jobs, ``cached`` of them already scored (from the cache)."""
    bar = SteadyRateBar(total=total, initial=cached, desc=desc, unit="job", disable=not enabled)
    if cached and enabled:
        bar.set_postfix_str(f"{cached} scores from the cache")
    return bar


def calibration_bar(expected_calls: int, enabled: bool) -> SteadyRateBar:
    """The bar of the full-precision calibration run, one step per denoiser call."""
    return SteadyRateBar(total=expected_calls, desc="calibration (full precision)", unit="call",
                         disable=not enabled)


@contextmanager
def quiet_pipeline(pipe) -> Iterator[None]:
    """The pipeline's own per-call progress bar off while the build runs it hundreds of times (the build's bars say
    where it is); the caller's setting is restored afterwards."""
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    saved = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**saved, "disable": True})
    try:
        yield
    finally:
        pipe._progress_bar_config = saved
