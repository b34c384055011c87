"""Regression tests of issue #17: an interrupted build of optimum-quanto's C++ extension never blocks later int4 /
int2 forwards (a stale ``lock`` is cleared with a message, a live build is waited for with a bound)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diffusers_mixdq import MixDQError
from diffusers_mixdq.apply.backends.quanto import build_lock
from diffusers_mixdq.apply.backends.quanto.modules import cache_dir

REPO = Path(__file__).resolve().parent.parent


def test_stale_lock_is_cleared_with_a_message(tmp_path, caplog):
    build_dir = tmp_path / "ext"
    build_dir.mkdir()
    (build_dir / "lock").write_text("")  # what a killed torch FileBaton leaves
    (build_dir / "quanto_cpp.so").write_bytes(b"")  # built before
    with caplog.at_level(logging.WARNING), build_lock.build_guard(build_dir):
        assert not (build_dir / "lock").exists()
    assert "removed the stale lock" in caplog.text and str(build_dir / "lock") in caplog.text
    assert "compiling" not in caplog.text  # already built: no first-compile message


def test_first_compile_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING), build_lock.build_guard(tmp_path / "new"):
        pass
    assert "compiling optimum-quanto's C++ extension" in caplog.text and "do not interrupt" in caplog.text


def test_live_build_is_waited_for_with_a_bound(tmp_path):
    """Another process holds the owner lock (a live build): we wait, then get an error naming the files."""
    build_dir = tmp_path / "ext"
    build_dir.mkdir()
    (build_dir / "lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(build_dir / 'lock.owner')!r}, 'a+')
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(str(os.getpid())); f.flush()
        print('held', flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(MixDQError, match=rf"pid {holder.pid}\) has been building .* delete .*lock"):
            with build_lock.build_guard(build_dir, wait_limit=0.5):
                pass
        assert time.monotonic() - t0 < 5
        assert (build_dir / "lock").exists()  # a live build's lock is never removed
    finally:
        holder.kill()
        holder.wait()
    with build_lock.build_guard(build_dir, wait_limit=5):  # the holder died: its lock is stale now
        assert not (build_dir / "lock").exists()


def test_int4_forward_with_a_planted_lock_finishes(tmp_path):
    """End to end, in a fresh process with its cache in a temp dir holding a stale lock: the int4 forward runs."""
    built = cache_dir() / "quanto-ext"
    if not any(built.glob("*/quanto_cpp.so")):
        pytest.skip("the extension is not built in this cache yet (building it takes ~40 s)")
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / "quanto-ext")  # copy2 keeps mtimes, so ninja sees nothing to rebuild
    for folder in (cache / "quanto-ext").iterdir():
        (folder / "lock").write_text("")
        (folder / "lock.owner").unlink(missing_ok=True)
    code = textwrap.dedent("""
        import torch
        from diffusers_mixdq import LayerSpec
        from diffusers_mixdq.apply import quantize_module
        layer = quantize_module(torch.nn.Linear(256, 64), LayerSpec(weights="int4"))
        print("out", layer(torch.randn(2, 256)).shape, flush=True)
    """)
    env = {**os.environ, "DIFFUSERS_MIXDQ_CACHE": str(cache), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "out torch.Size([2, 64])" in result.stdout
    assert "removed the stale lock" in result.stderr
    assert not any((cache / "quanto-ext").glob("*/lock"))
