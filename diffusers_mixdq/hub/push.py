"""Publishing plans: :func:`push_plan` (and ``mixdq push``) uploads plans and their model card in one commit."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..errors import PlanPushError
from ..plan import BitPlan
from .card import plan_card
from .failures import transfer_errors
from .layout import CARD_FILENAME, collect_plans, is_plan_file

#: what to do after an HTTP error answer while publishing, by status code
WRITE_HINTS = {
    401: "Log in with `hf auth login` or pass token= (a token with write access).",
    403: "Your token cannot write to this namespace or repository: use a write token or another repo id.",
    None: "Try again later.",
}


def repo_files(plans: dict[str, BitPlan], repo_id: str) -> dict[str, bytes]:
    """``{path in repo: content}`` for ``plans`` (``{folder: plan}``): each plan's ``plan.json`` and sidecar, written
    by :meth:`BitPlan.save`, plus the generated ``README.md``."""
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="mixdq-push-") as tmp:
        for folder, plan in plans.items():
            target = Path(tmp) / (folder or "_root")
            plan.save(target)
            for f in sorted(target.iterdir()):
                files[f"{folder}/{f.name}" if folder else f.name] = f.read_bytes()
    files[CARD_FILENAME] = str(plan_card(plans, repo_id)).encode("utf-8")
    return files


def push_plan(
    plan: Any,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    component: str | None = None,
):
    """Publish a plan (or a set of component plans) and its model card to ``repo_id`` on the Hub, in one commit.

    Args:
        plan: a :class:`~diffusers_mixdq.BitPlan`, a ``{component: BitPlan}`` mapping, a plan ``.json`` file, or a
            plan directory with ``plan.json`` at its root and/or in component folders (``unet/plan.json``, ...).
            Every plan is validated before anything is sent.
        repo_id: ``namespace/name``; the model repository is created if it does not exist.
        private: create the repository private (an existing repository keeps its visibility).
        revision: the branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message: default ``"Upload MixDQ plan"``.
        token: Hub token (default: the logged-in one / ``HF_TOKEN``).
        component: publish a single root-level plan in this component's folder instead (e.g. ``"unet"``).

    The repository then holds exactly these plans: stale plan files of the layout (``plan.json`` /
    ``plan.safetensors`` at the root or in a component folder) that this push does not rewrite are deleted in the
    same commit; other files (model weights, ...) are left alone, and ``README.md`` is replaced by the generated
    card. Returns huggingface_hub's ``CommitInfo`` (``.oid`` is the commit sha, ``.commit_url`` its page). Raises
    :class:`PlanPushError` when the Hub refuses or cannot be reached, ``MixDQError`` for invalid plans.
    """
    from huggingface_hub import HfApi

    files = repo_files(collect_plans(plan, component), repo_id)
    api = HfApi(token=token)
    branch = revision or "main"
    doing = f"publishing the plan to Hub repo '{repo_id}' (branch '{branch}')"
    with transfer_errors(doing, WRITE_HINTS, error=PlanPushError):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations=_operations(api, repo_id, branch, files),
            commit_message=commit_message or "Upload MixDQ plan",
            revision=branch,
        )


def _operations(api, repo_id: str, branch: str, files: dict[str, bytes]) -> list:
    """Add ``files``; delete the plan files of the layout on ``branch`` that they do not replace."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    stale = sorted(p for p in api.list_repo_files(repo_id, revision=branch) if is_plan_file(p) and p not in files)
    return [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()] + [
        CommitOperationDelete(path_in_repo=p) for p in stale
    ]
