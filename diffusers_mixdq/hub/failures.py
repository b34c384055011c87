"""What went wrong talking to the Hub, said once: huggingface_hub's exceptions turned into our errors.

- :func:`hub_lookup_errors`: "not reachable and not cached", "no such repo", "no such revision";
- :func:`transfer_errors`: any other HTTP error answer and transport failures, for reads and for pushes;
- :func:`missing_plan_message`: a missing ``plan.json``, naming the plans the repo does have (:func:`list_plans`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Mapping

from ..errors import MixDQError, PlanSourceError
from ..plan import PLAN_FILENAME

#: what to do after an HTTP error answer while reading from the Hub, by status code
READ_HINTS = {
    401: "The token is invalid or lacks access to this repo: pass a valid token=... (or log in with `hf auth login`).",
    403: "The token is invalid or lacks access to this repo: pass a valid token=... (or log in with `hf auth login`).",
    None: "This is a server-side problem: try again later. Nothing was cached.",
}


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level exceptions of whichever HTTP library huggingface_hub uses (only those already imported)."""
    errors: list[type[BaseException]] = [OSError]
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def status_of(e: BaseException) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _status(e: BaseException) -> str:
    code = status_of(e)
    return f"HTTP {code}" if code is not None else f"an error ({first_line(e)})"


@contextmanager
def transfer_errors(doing: str, hints: Mapping[int | None, str], error: type[MixDQError] = PlanSourceError):
    """Turn an HTTP error answer or a transport failure raised inside the block into one ``error`` saying what was
    being done (``doing``, e.g. ``"downloading 'plan.json' of Hub repo 'a/b'"``) and what to do (``hints`` by
    status code, ``None``: any other)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as e:
        hint = hints.get(status_of(e), hints[None])
        raise error(f"The Hub at {endpoint()} answered {_status(e)} while {doing}: {first_line(e)}. {hint}") from None
    except network_errors() as e:
        if offline():
            raise error(f"HF_HUB_OFFLINE is set: unset it for {doing}.") from None
        raise error(
            f"The Hub at {endpoint()} could not be reached while {doing} ({type(e).__name__}: {first_line(e)}). "
            "Check the connection (and HF_ENDPOINT) and try again."
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


def repo_not_found_message(repo_id: str) -> str:
    return (
        f"No plan found for '{repo_id}': it is not a local file or directory, and the Hub at {endpoint()} has no "
        f"model repository '{repo_id}' that you can read. Check the spelling of the path or repo id; if the repo is "
        "private or gated, pass token=... (or log in with `hf auth login`)."
    )


def unreachable_message(repo_id: str, what: str, revision: str, error: BaseException | None) -> str:
    if offline():
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
        reason = f" ({type(cause).__name__}: {first_line(cause)})"
    return (
        f"Could not download {what} of Hub repo '{repo_id}' (revision '{revision}'): the Hub at {endpoint()} could "
        f"not be reached or failed{reason}, and there is no cached copy. Check the connection (and HF_ENDPOINT) and "
        "try again later; once downloaded, a plan is also usable offline from the cache."
    )


def missing_plan_message(repo_id: str, filename: str, revision: str | None, token: str | bool | None) -> str:
    msg = f"Hub repo '{repo_id}' (revision '{revision or 'main'}') has no '{filename}'."
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

    if offline():
        return None
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except (HfHubHTTPError, *network_errors()):
        return None
    parts = [f.split("/") for f in files]
    return sorted("/".join(p[:-1]) for p in parts if p[-1] == PLAN_FILENAME and len(p) <= 2)
