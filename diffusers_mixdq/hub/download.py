"""Plans from the Hugging Face Hub: the plan-source resolver behind ``MixDQConfig(plan="user/repo")``.

Everything goes through ``huggingface_hub.hf_hub_download``, so its download cache, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and tokens work as for any other Hub file. On top of the client this module

- records where a plan came from: the returned plan's ``provenance["source"]`` holds the repo id, the requested
  revision, the **commit sha** it resolved to (the snapshot the cache put it in) and the subfolder, so a model
  quantized with it carries them in its ``config.json``;
- checks every downloaded file against the checksum the Hub gave for it, and removes a corrupted or unreadable
  file from the cache so a later download starts clean (:mod:`.cache`);
- turns every failure into one :class:`~diffusers_mixdq.errors.PlanSourceError` that says what is wrong and what
  to do (:mod:`.failures`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import PlanFormatError, PlanSourceError
from ..plan import BitPlan, check_tensors, load_tensors
from .cache import commit_of, evict, verify
from .failures import READ_HINTS, hub_lookup_errors, missing_plan_message, transfer_errors
from .layout import normalize_subfolder, plan_path

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
    path, commit, where = _fetch(repo_id, filename, revision, token,
                                 partial(missing_plan_message, repo_id, filename, revision, token))
    with _evicted_if_invalid(path, f"The plan file {where} is not a valid diffusers-mixdq plan: ",
                             "\nThe repository holds a broken plan; ask its owner to publish it again with `mixdq "
                             "push`, or pin an earlier good commit with revision=."):
        text = Path(path).read_bytes().decode("utf-8")
        plan = BitPlan.from_json(text, source=where)
    sidecar = json.loads(text).get("tensors")
    if sidecar:
        tensors = _sidecar(repo_id, _sidecar_path(sidecar, subfolder, where), revision, commit, token, where)
        try:
            plan.tensors = check_tensors(plan.target, tensors, f"of {where}", plan.layers)
        except PlanFormatError as e:
            raise PlanSourceError(f"{e}\nThe repository holds a broken plan; ask its owner to publish it again with "
                                  "`mixdq push`, or pin an earlier good commit with revision=.") from None
    plan.provenance["source"] = {"repo_id": repo_id, "revision": revision or "main", "commit": commit,
                                 "subfolder": subfolder}
    return plan


def _sidecar(repo_id: str, name: str, revision: str | None, commit: str | None, token, plan_file: str) -> dict:
    """The tensors of the sidecar ``name``, from the same commit as the plan."""
    missing = (
        f"The plan {plan_file} names the tensor sidecar '{name.rsplit('/', 1)[-1]}', but the repository has no "
        f"'{name}'. Publish the plan again with `mixdq push` (it uploads plan.json and its sidecar together)."
    )
    path, _, where = _fetch(repo_id, name, revision, token, lambda: missing, at=commit)
    with _evicted_if_invalid(path, f"The tensor sidecar {where} of this plan is unreadable: ", "\nPublish the plan "
                             "again with `mixdq push`, or pin an earlier good commit with revision=."):
        return load_tensors(path)


def _fetch(repo_id: str, filename: str, revision: str | None, token, missing: Callable[[], str], at=None):
    """``(path, commit, where)`` of ``filename`` downloaded at ``at`` (default: ``revision``) and checked against
    its checksum; ``where`` names it in messages."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    path = _download(repo_id, filename, at or revision, token, missing)
    pinned = revision if revision and REGEX_COMMIT_HASH.fullmatch(revision) else None
    commit = commit_of(path, filename) or at or pinned
    where = _where(repo_id, filename, revision, commit)
    verify(path, where)
    return path, commit, where


@contextmanager
def _evicted_if_invalid(path: str, before: str, after: str):
    """A file the block finds invalid is removed from the cache, and ``before + reason + after`` raised."""
    try:
        yield
    except (PlanFormatError, UnicodeDecodeError) as e:
        evict(path)
        raise PlanSourceError(f"{before}{e}{after}") from None


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


def _download(repo_id: str, filename: str, revision: str | None, token, missing: Callable[[], str]) -> str:
    """``hf_hub_download`` with every failure turned into a :class:`PlanSourceError` (``missing()``: the message
    when the repo has no such file)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    doing = f"downloading '{filename}' of Hub repo '{repo_id}' (revision '{revision or 'main'}')"
    with transfer_errors(doing, READ_HINTS), hub_lookup_errors(repo_id, f"'{filename}'", revision):
        try:
            return hf_hub_download(repo_id, filename, revision=revision, token=token)
        except RemoteEntryNotFoundError:
            raise PlanSourceError(missing()) from None
