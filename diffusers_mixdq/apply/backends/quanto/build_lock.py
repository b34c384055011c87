"""optimum-quanto's C++ extension build (int4 / int2 on CPU), made safe to interrupt.

torch's JIT build (``torch.utils.cpp_extension.load``) takes a ``FileBaton``: it creates ``<build dir>/lock``,
builds, and deletes the file; every other process that finds the file *waits until it disappears*. The file records
no owner, so a build killed before it deletes the file (Ctrl-C at the wrong moment, a killed process, a closed
terminal) leaves a lock that makes every later int4 / int2 forward wait forever, silently.

The build directory is private to diffusers-mixdq (under :func:`~.modules.cache_dir`) and every build in it runs
inside :func:`build_guard`, which holds an OS advisory lock (``fcntl.flock``) on ``<build dir>/lock.owner`` for the
whole build. The kernel drops that lock when its process dies, however it dies. So:

* holding ``lock.owner`` means no other build is alive; a ``lock`` file found then is stale: it is removed, with a
  message naming it;
* a live build holds ``lock.owner``: we wait for it, for at most :data:`WAIT_LIMIT` seconds (a build takes ~40 s),
  then raise a :class:`~diffusers_mixdq.errors.MixDQError` naming the files, never wait forever;
* without ``fcntl`` (Windows) the age of ``lock`` decides: older than :data:`WAIT_LIMIT` is stale.

Before a first build (no compiled library in the directory yet) one line says that it is compiling and how long it
takes, so nobody interrupts it thinking it hangs.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from ....errors import MixDQError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

#: torch's FileBaton file, and ours beside it
BATON = "lock"
OWNER = "lock.owner"
#: longest wait for another live build (seconds); also the age past which a lock is stale without fcntl
WAIT_LIMIT = 600.0
POLL = 0.25


@contextmanager
def build_guard(build_dir: str | os.PathLike, name: str = "quanto_cpp", wait_limit: float = WAIT_LIMIT):
    """Run an extension build in ``build_dir`` safely (see the module docstring)."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / OWNER, "a+") as owner:
        if fcntl is not None:
            _wait_for_owner(owner, build_dir, wait_limit)
            _clear_stale(build_dir / BATON, "no live process is building")
        else:  # pragma: no cover - Windows
            _wait_by_age(build_dir / BATON, wait_limit)
        owner.seek(0)
        owner.truncate()
        owner.write(f"{os.getpid()}\n")
        owner.flush()
        if not any(build_dir.glob(f"{name}*.so")) and not any(build_dir.glob(f"{name}*.pyd")):
            logger.warning("diffusers-mixdq: compiling optimum-quanto's C++ extension for int4/int2 weights into %s "
                           "(once, about a minute; do not interrupt) ...", build_dir)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(owner, fcntl.LOCK_UN)


def _wait_for_owner(owner, build_dir: Path, wait_limit: float) -> None:
    deadline = time.monotonic() + wait_limit
    while True:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() >= deadline:
                owner.seek(0)
                pid = owner.read().strip() or "unknown"
                raise MixDQError(
                    f"Another process (pid {pid}) has been building optimum-quanto's C++ extension in {build_dir} "
                    f"for over {wait_limit:.0f} s. Wait for it to finish, or stop it; if no such process runs, "
                    f"delete {build_dir / BATON} and {build_dir / OWNER}."
                ) from None
            time.sleep(POLL)


def _clear_stale(baton: Path, why: str) -> None:
    if baton.exists():
        try:
            baton.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise MixDQError(f"{baton} is a stale lock left by an interrupted build of optimum-quanto's C++ "
                             f"extension ({why}), and it cannot be removed ({e.strerror}). Delete it by hand.") from None
        logger.warning("diffusers-mixdq: removed the stale lock %s left by an interrupted build of optimum-quanto's "
                       "C++ extension (%s).", baton, why)


def _wait_by_age(baton: Path, wait_limit: float) -> None:  # pragma: no cover - Windows
    while baton.exists():
        try:
            age = time.time() - baton.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= wait_limit:
            _clear_stale(baton, f"it is {age:.0f} s old")
            return
        time.sleep(POLL)


def guard_extension(ext) -> None:
    """Make ``ext`` (an optimum-quanto ``Extension``) build inside :func:`build_guard` (idempotent)."""
    base = type(ext)
    if getattr(base, "_mixdq_guarded", False):
        return

    def lib(self):
        if self._lib is None:
            with build_guard(self.build_directory, self.name):
                return base.lib.fget(self)
        return self._lib

    ext.__class__ = type(f"Guarded{base.__name__}", (base,), {"lib": property(lib), "_mixdq_guarded": True})
