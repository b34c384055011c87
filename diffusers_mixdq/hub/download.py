"""Plans from the Hugging Face Hub: the plan-source resolver behind ``MixDQConfig(plan="user/repo")``.

Everything goes through ``huggingface_hub`` (``hf_hub_download`` / ``snapshot_download``), so its download cache,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and tokens work as for any other Hub file. On top of the client this module

- records where a plan came from: the returned plan's ``provenance["source"]`` holds the repo id, the requested
  revision, the **commit sha** it resolved to and the subfolder, so a model quantized with it carries them in its
  ``config.json``;
- checks every downloaded file against the checksum the Hub gave for it (the ETag: git blob sha1, or sha256 for
  LFS files) and removes a corrupted or unreadable file from the cache, so a later download starts clean;
- turns every failure into one :class:`~diffusers_mixdq.errors.PlanSourceError` that says what is wrong and what
  to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

from ..errors import PlanFormatError, PlanSourceError
from ..plan import PLAN_FILENAME, BitPlan
from .layout import normalize_subfolder, plan_path

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------- what goes to the Hub
def looks_like_repo_id(source: str) -> bool:
    """True for ``namespace/name`` strings that are valid Hub repo ids and not an existing local path.

    Strings ending in ``.json`` are taken for (missing) local plan files, never for repo ids.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(source, str) or source.count("/") != 1 or source.lower().endswith(".json"):
        return False
    if os.path.exists(source):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def hub_plan_source(source: str, options: Mapping[str, Any]) -> BitPlan | None:
    """Plan-source resolver (see :func:`diffusers_mixdq.plan.register_source`): repo ids go to the Hub."""
    if not looks_like_repo_id(source):
        return None
    return download_plan(
        source, revision=options.get("revision"), subfolder=options.get("subfolder"), token=options.get("token")
    )


# ---------------------------------------------------------------------------------------------- download
def download_plan(
    repo_id: str,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
) -> BitPlan:
    """Download and validate the plan ``[subfolder/]plan.json`` (and its safetensors sidecar) of ``repo_id``.

    ``revision`` is a branch, a tag or a commit sha (default: ``main``). The result's ``provenance["source"]`` is
    ``{"repo_id", "revision" (as requested), "commit" (the sha it resolved to), "subfolder"}``. Raises
    :class:`~diffusers_mixdq.errors.PlanSourceError`.
    """
    subfolder = normalize_subfolder(subfolder)
    filename = plan_path(subfolder)
    path = _download(repo_id, filename, revision, token)
    commit = _commit_of(path, filename) or (revision if revision and _HEX40.fullmatch(revision) else None)
    where = _where(repo_id, filename, revision, commit)
    _verify(path, where)
    try:
        text = Path(path).read_bytes().decode("utf-8")
        plan = BitPlan.from_json(text, source=where)
        sidecar = json.loads(text).get("tensors")
    except (PlanFormatError, UnicodeDecodeError) as e:
        _evict(path)
        raise PlanSourceError(
            f"The plan file {where} is not a valid diffusers-mixdq plan: {e}\nThe repository holds a broken plan; "
            "ask its owner to publish it again with `mixdq push`, or pin an earlier good commit with revision=."
        ) from None
    if sidecar:
        side_name = _sidecar_path(sidecar, subfolder, where)
        side_path = _download(repo_id, side_name, commit or revision, token, what="tensor sidecar", plan_file=where)
        side_where = _where(repo_id, side_name, revision, commit)
        _verify(side_path, side_where)
        from ..plan import load_tensors

        try:
            plan.tensors = load_tensors(side_path)
        except PlanFormatError as e:
            _evict(side_path)
            raise PlanSourceError(
                f"The tensor sidecar {side_where} of this plan is unreadable: {e}\nPublish the plan again with "
                "`mixdq push`, or pin an earlier good commit with revision=."
            ) from None
    plan.provenance["source"] = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": commit,
        "subfolder": subfolder,
    }
    return plan


def _where(repo_id: str, filename: str, revision: str | None, commit: str | None) -> str:
    at = []
    if revision and revision != commit:
        at.append(f"revision '{revision}'")
    if commit:
        at.append(f"commit {commit[:12]}")
    return f"'{filename}' of Hub repo '{repo_id}'" + (f" ({', '.join(at)})" if at else "")


def _sidecar_path(name: Any, subfolder: str | None, where: str) -> str:
    if not isinstance(name, str) or name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
        raise PlanSourceError(
            f"The plan {where} names its tensor sidecar {name!r}, which is not a file name beside plan.json."
        )
    return f"{subfolder}/{name}" if subfolder else name


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level exceptions of whichever HTTP library huggingface_hub uses (only those already imported)."""
    errors: list[type[BaseException]] = [OSError]
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        mod = sys.modules.get(module)
        cls = getattr(mod, attr, None) if mod is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def _download(
    repo_id: str,
    filename: str,
    revision: str | None,
    token: str | bool | None,
    what: str = "plan",
    plan_file: str | None = None,
) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    rev = revision or "main"
    try:
        with hub_lookup_errors(repo_id, f"'{filename}'", revision):
            return hf_hub_download(repo_id, filename, revision=revision, token=token)
    except EntryNotFoundError:
        if plan_file is not None:
            raise PlanSourceError(
                f"The plan {plan_file} names the {what} '{filename.rsplit('/', 1)[-1]}', but the repository has no "
                f"'{filename}'. Publish the plan again with `mixdq push` (it uploads plan.json and its sidecar "
                "together)."
            ) from None
        raise PlanSourceError(missing_plan_message(repo_id, filename, revision, token)) from None
    except HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
            raise PlanSourceError(
                f"The Hub at {_endpoint()} refused access ({_status(e)}) to '{filename}' of '{repo_id}': the token "
                "is invalid or lacks access to this repo. Pass a valid token=... (or log in with `hf auth login`)."
            ) from None
        raise PlanSourceError(
            f"The Hub at {_endpoint()} answered {_status(e)} while downloading '{filename}' of '{repo_id}' "
            f"(revision '{rev}'). This is a server-side problem: try again later. Nothing was cached."
        ) from None
    except network_errors() as e:
        raise PlanSourceError(
            f"Downloading '{filename}' of Hub repo '{repo_id}' (revision '{rev}') from {_endpoint()} failed: "
            f"{type(e).__name__}: {_first_line(e)}. Try again; nothing was cached."
        ) from None


@contextmanager
def hub_lookup_errors(repo_id: str, what: str, revision: str | None):
    """Turn huggingface_hub's "not reachable and not cached", "no such repo" and "no such revision" errors raised
    inside the block into one :class:`PlanSourceError` saying what to do (``what`` names what was being fetched)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    rev = revision or "main"
    try:
        yield
    except LocalEntryNotFoundError as e:
        # not on the Hub (unreachable, offline, server error) and not in the cache either
        raise PlanSourceError(unreachable_message(repo_id, what, rev, e)) from None
    except RepositoryNotFoundError:
        raise PlanSourceError(repo_not_found_message(repo_id)) from None
    except RevisionNotFoundError:
        raise PlanSourceError(
            f"Hub repo '{repo_id}' has no revision '{rev}' (no such branch, tag or commit). Check revision=, or "
            "leave it out to use 'main'."
        ) from None


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code is not None else f"an error ({_first_line(e)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def repo_not_found_message(repo_id: str) -> str:
    return (
        f"No plan found for '{repo_id}': it is not a local file or directory, and the Hub at {_endpoint()} has no "
        f"model repository '{repo_id}' that you can read. Check the spelling of the path or repo id; if the repo is "
        "private or gated, pass token=... (or log in with `hf auth login`)."
    )


def unreachable_message(repo_id: str, what: str, revision: str, error: BaseException | None) -> str:
    if _offline():
        return (
            f"HF_HUB_OFFLINE is set and {what} of Hub repo '{repo_id}' (revision '{revision}') is not in the local "
            "Hugging Face cache. Load it once while online (the cache is reused offline afterwards), or unset "
            "HF_HUB_OFFLINE."
        )
    cause = error.__cause__ if error is not None else None
    if cause is None:
        reason = ""
    elif getattr(cause, "response", None) is not None:
        reason = f" ({_status(cause)})"
    else:
        reason = f" ({type(cause).__name__}: {_first_line(cause)})"
    return (
        f"Could not download {what} of Hub repo '{repo_id}' (revision '{revision}'): the Hub at {_endpoint()} could "
        f"not be reached or failed{reason}, and there is no cached copy. Check the connection (and HF_ENDPOINT) and "
        "try again later; once downloaded, a plan is also usable offline from the cache."
    )


def missing_plan_message(repo_id: str, filename: str, revision: str | None, token: str | bool | None) -> str:
    rev = revision or "main"
    msg = f"Hub repo '{repo_id}' (revision '{rev}') has no '{filename}'."
    available = list_plans(repo_id, revision, token)
    if available is None:
        return msg + " Check subfolder= and revision=."
    if not available:
        return msg + (
            f" It holds no plan at all (no {PLAN_FILENAME} at its root or in a component folder): is it a plan "
            f"repository? Publish one with `mixdq push PLAN_DIR {repo_id}`."
        )
    hints = ", ".join("the root (no subfolder)" if not sub else f"subfolder='{sub}'" for sub in available)
    return msg + f" It has plans for: {hints}. Pass one of these to MixDQConfig."


def list_plans(repo_id: str, revision: str | None, token: str | bool | None) -> list[str] | None:
    """Folders of ``repo_id`` holding a ``plan.json`` (``""``: the root), or ``None`` when the Hub cannot say."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if _offline():
        return None
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except (HfHubHTTPError, *network_errors()):
        return None
    out = []
    for f in files:
        parts = f.split("/")
        if parts[-1] == PLAN_FILENAME and len(parts) <= 2:
            out.append("" if len(parts) == 1 else parts[0])
    return sorted(out)


# ---------------------------------------------------------------------------------------------- cache integrity
def _commit_of(path: str, filename: str) -> str | None:
    """The commit sha of a file in the HF cache layout ``.../snapshots/<sha>/<filename>``."""
    p = Path(path)
    for _ in filename.split("/"):
        p = p.parent
    if p.parent.name == "snapshots" and _HEX40.fullmatch(p.name):
        return p.name
    return None


def _blob_of(path: str) -> Path | None:
    """The cache blob a snapshot entry points to (its name is the file's ETag), when the cache uses symlinks."""
    if not os.path.islink(path):
        return None
    blob = Path(os.path.realpath(path))
    return blob if blob.parent.name == "blobs" else None


def _verify(path: str, where: str) -> None:
    """Check ``path`` against its ETag (git blob sha1, or sha256 for LFS files); evict it and raise if corrupted."""
    blob = _blob_of(path)
    if blob is None or not blob.is_file():
        return
    etag = blob.name
    data = blob.read_bytes()
    if _HEX40.fullmatch(etag):
        actual = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    elif _HEX64.fullmatch(etag):
        actual = hashlib.sha256(data).hexdigest()
    else:
        return  # an ETag of another kind: nothing to compare with
    if actual != etag:
        _evict(path)
        raise PlanSourceError(
            f"The download of {where} is corrupted: its content does not match the checksum the Hub gave for it "
            f"(expected {etag[:12]}, got {actual[:12]}). The corrupted file was removed from the cache; try again."
        )


def _evict(path: str) -> None:
    """Remove a snapshot entry and the blob behind it from the HF cache (best effort)."""
    blob = _blob_of(path)
    for p in (path, blob):
        if p is None:
            continue
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        except OSError:  # read-only cache: the next download fails the same checks
            pass
