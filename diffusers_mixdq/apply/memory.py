"""Keeping quantize-on-load lean: release the checkpoint's pages and the allocator's free memory.

Two things otherwise keep memory that a quantized model no longer needs:

* safetensors maps the whole checkpoint file; any tensor still viewing that mapping (a bias, a norm weight, a
  layer kept in floating point) keeps the full-precision file mapped and its touched pages resident.
* glibc's allocator keeps the heap pages freed by the per-layer quantization temporaries instead of returning
  them to the system (fragmentation), so resident memory stays near its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import threading
import time
from functools import lru_cache

import psutil
from torch import nn


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_free_memory() -> None:
    """Return the allocator's free heap pages to the system (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def detach_from_checkpoint(model: nn.Module, skip: set[int]) -> None:
    """Give every parameter and buffer of ``model`` its own storage (except tensors whose ``id`` is in ``skip``),
    so no tensor keeps the memory-mapped full-precision checkpoint alive."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in skip or p.device.type != "cpu":
                continue
            module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is None or id(b) in skip or b.device.type != "cpu":
                continue
            module._buffers[name] = b.clone()


def process_memory() -> dict[str, int]:
    """Bytes of this process's resident memory, named as Linux's ``/proc/self/status`` names them: ``VmRSS``,
    ``VmHWM`` (peak RSS), ``RssFile`` (file-backed and shared pages) and ``RssAnon`` (the rest: what the
    process allocated itself). Read through psutil (and ``getrusage`` for the peak)."""
    info = psutil.Process().memory_info()
    shared = getattr(info, "shared", 0)  # Linux: RssFile + RssShmem
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"VmRSS": info.rss, "VmHWM": max(peak, info.rss), "RssAnon": info.rss - shared, "RssFile": shared}


class PeakMemory:
    """Peak RSS and peak anonymous RSS of this process while the ``with`` block runs (sampled every ``interval``
    seconds by a thread; the RSS peak also takes the kernel's high-water mark at exit)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self._stop = threading.Event()

    def _sample(self, rss_key: str) -> None:
        s = process_memory()
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.peak_rss = max(self.peak_rss, s[rss_key])

    def _run(self):
        while not self._stop.is_set():
            self._sample("VmRSS")
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample("VmHWM")
