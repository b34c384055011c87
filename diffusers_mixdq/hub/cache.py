"""Downloaded plan files in the Hugging Face cache: the commit they belong to, their checksum, their eviction.

huggingface_hub stores a file downloaded at commit ``<sha>`` as ``.../snapshots/<sha>/<filename>``, a link to the
repo blob named by the file's ETag (git blob sha1, or sha256 for LFS files). It checks the size of what it
received, not its content, so :func:`verify` hashes the file (with huggingface_hub's ``git_hash`` / ``sha_fileobj``)
and compares. :func:`evict` removes a file with huggingface_hub's own cache API (``scan_cache_dir().delete_files``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PlanSourceError


def snapshot_commit(snapshot: str | os.PathLike) -> str | None:
    """The commit sha of a snapshot folder of the cache (``.../snapshots/<sha>``), else ``None``."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    snapshot = Path(snapshot)
    if snapshot.parent.name == "snapshots" and REGEX_COMMIT_HASH.fullmatch(snapshot.name):
        return snapshot.name
    return None


def commit_of(path: str, filename: str) -> str | None:
    """The commit sha ``filename`` (a path inside the repo) was downloaded at, from where the cache put it."""
    return snapshot_commit(Path(path).parents[filename.count("/")])


def verify(path: str, where: str) -> None:
    """Check ``path`` against its ETag; evict it and raise :class:`PlanSourceError` if its content differs."""
    etag = _etag(path)
    actual = _checksum(path, etag) if etag else None
    if actual is not None and actual != etag:
        evict(path)
        raise PlanSourceError(
            f"The download of {where} is corrupted: its content does not match the checksum the Hub gave for it "
            f"(expected {etag[:12]}, got {actual[:12]}). The corrupted file was removed from the cache; try again."
        )


def _etag(path: str) -> str | None:
    """The name of the repo blob a snapshot entry links to (first link only: a blob may link on into a shared
    store), or ``None`` in a cache without links."""
    return Path(os.readlink(path)).name if os.path.islink(path) else None


def _checksum(path: str, etag: str) -> str | None:
    """The file's hash of the kind ``etag`` is (sha256 or git blob sha1); ``None`` for ETags of another kind."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, REGEX_SHA256
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    if REGEX_SHA256.fullmatch(etag):
        with open(path, "rb") as f:
            return sha_fileobj(f).hex()
    if REGEX_COMMIT_HASH.fullmatch(etag):
        return git_hash(Path(path).read_bytes())
    return None


def evict(path: str) -> None:
    """Remove a cached file from the cache: its blob and every snapshot entry sharing that blob (best effort)."""
    from huggingface_hub import constants, scan_cache_dir

    entry = Path(os.path.realpath(os.path.dirname(path))) / os.path.basename(path)
    cache = scan_cache_dir(constants.HF_HUB_CACHE)
    files = [f for repo in cache.repos for revision in repo.revisions for f in revision.files]
    blob = next((f.blob_path for f in files if f.file_path == entry), None)
    if blob is None:
        return
    try:
        cache.delete_files(*(f for f in files if f.blob_path == blob)).execute()
    except OSError:  # a read-only cache: the next download fails the same checks
        pass
