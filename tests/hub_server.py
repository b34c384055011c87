"""A test double of the Hugging Face Hub's HTTP API, for the test suite only: it is NOT the Hub.

``LoopbackHub`` runs a stdlib ``http.server`` in a thread on 127.0.0.1 (ephemeral port). Point
``huggingface_hub`` at it (``HF_ENDPOINT`` / ``huggingface_hub.constants.ENDPOINT``) and the real client talks real
HTTP to it. It keeps model repositories in memory as commit histories (every commit is a full snapshot of the
repo's files; branches and tags point at commits) and speaks the part of the Hub API that ``huggingface_hub``,
diffusers' ``from_pretrained`` / ``save_pretrained(push_to_hub=True)`` and diffusers-mixdq use:

- ``POST /api/repos/create`` (creates the repo with an initial commit holding ``.gitattributes``; 409 if it exists)
- ``POST /api/validate-yaml`` (the model card's YAML front matter must parse)
- ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``: repo info with ``sha``,
  ``siblings`` (``?blobs=true`` adds sizes and blob ids), ``cardData`` / ``tags`` / ``library_name`` from README.md
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]`` (``?recursive=true``) and
  ``POST /api/models/{repo_id}/paths-info/{revision}``: file listings
- ``GET /api/models/{repo_id}/refs``, ``GET /api/models/{repo_id}/commits/{revision}``, ``GET /api/whoami-v2``,
  ``GET /api/agent-harnesses`` (answered with an empty registry)
- ``POST /api/models/{repo_id}/preupload/{revision}``: answers ``"uploadMode": "regular"`` for every file, so no
  LFS or Xet storage is involved
- ``POST /api/models/{repo_id}/commit/{revision}``: NDJSON body (header, ``file`` with base64 content,
  ``deletedFile``, ``deletedFolder``); ``parentCommit`` is checked
- ``POST /api/models/{repo_id}/branch/{branch}`` and ``POST /api/models/{repo_id}/tag/{revision}``
- ``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{path}`` for branch names, tags and commit shas, with the headers
  the client relies on (``X-Repo-Commit``, ``ETag`` = the git blob sha1, ``Content-Length``; never Xet headers)
  and ``Range: bytes=N-``.

Errors carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the
client raises its usual exceptions. Writes need a known token (``Authorization: Bearer ...``); private repos are
visible to their owner's token only (401 + ``RepoNotFound`` otherwise, like the Hub).

Fault injection for tests: :meth:`LoopbackHub.fault` makes matching requests answer an HTTP error (e.g. 500, with
``Retry-After: 0`` so the client's retries stay fast) or serve corrupted file bytes of the right length; every
request is logged in :attr:`LoopbackHub.requests`, and requests no route understood in :attr:`LoopbackHub.unhandled`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: the Hub's ETag for files stored in git (not LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag or a full commit sha (``refs/heads/x`` / ``refs/tags/x`` accepted too)."""
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix) and revision[len(prefix) :] in table:
                return self.commits[table[revision[len(prefix) :]]]
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        if _COMMIT_SHA.fullmatch(revision) and revision in self.commits:
            return self.commits[revision]
        return None

    def history(self, oid: str) -> list[Commit]:
        out = []
        while oid is not None:
            commit = self.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out


@dataclass
class Fault:
    """Makes matching requests fail: ``status`` (an HTTP error code) or ``corrupt`` (flip bytes of served files)."""

    status: int | None = None
    corrupt: bool = False
    methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    match: str | None = None  # substring of the request path (unquoted)
    times: int | None = None  # how many requests to affect; None: until cleared

    def applies(self, method: str, path: str) -> bool:
        if method not in self.methods or (self.match is not None and self.match not in path):
            return False
        return self.times is None or self.times > 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _front_matter(readme: bytes | None) -> dict:
    if not readme:
        return {}
    import yaml

    text = readme.decode("utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    data = yaml.safe_load(m.group(1)) or {}
    return data if isinstance(data, dict) else {}


class LoopbackHub:
    """The server and its in-memory state. Use :meth:`start` / :meth:`stop` (or as a context manager)."""

    def __init__(self, tokens: dict[str, str] | None = None):
        #: token -> user name
        self.tokens: dict[str, str] = dict(tokens or {"hf_loopback_test_token": "tester"})
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._fault: Fault | None = None
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    @contextlib.contextmanager
    def fault(self, **kwargs: Any) -> Iterator[Fault]:
        """``with hub.fault(status=500): ...`` or ``with hub.fault(corrupt=True, match="plan.json"): ...``."""
        fault = Fault(**kwargs)
        with self._lock:
            self._fault = fault
        try:
            yield fault
        finally:
            self.clear_fault()

    def set_fault(self, **kwargs: Any) -> Fault:
        with self._lock:
            self._fault = Fault(**kwargs)
            return self._fault

    def clear_fault(self) -> None:
        with self._lock:
            self._fault = None

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or not fault.applies(method, path):
                return None
            if fault.times is not None:
                fault.times -= 1
            return fault

    # ------------------------------------------------------------------ repo operations (also used directly by tests)
    def _new_oid(self, *parts: Any) -> str:
        h = hashlib.sha1()
        for p in (*parts, next(self._counter)):
            h.update(repr(p).encode())
        return h.hexdigest()

    def create_repo(self, repo_id: str, owner: str, private: bool = False) -> Repo:
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo")
            repo = Repo(repo_id=repo_id, owner=owner, private=private, created_at=_now())
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit", "", owner)
            return repo

    def _commit(
        self,
        repo: Repo,
        branch: str,
        added: dict[str, bytes],
        deleted: list[tuple[str, bool]],
        title: str,
        description: str,
        author: str,
        parent_commit: str | None = None,
    ) -> Commit:
        with self._lock:
            head = repo.branches.get(branch)
            if head is None and repo.commits:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"A commit has happened since {parent_commit}; pull the latest head and retry.")
            files = dict(repo.commits[head].files) if head else {}
            for path, is_folder in deleted:
                if is_folder:
                    prefix = path.rstrip("/") + "/"
                    gone = [p for p in files if p.startswith(prefix)]
                    if not gone:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        del files[p]
                else:
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
            files.update(added)
            message = title + ("\n\n" + description if description else "")
            oid = self._new_oid(repo.repo_id, head, sorted((p, git_blob_sha1(b)) for p, b in files.items()), message)
            commit = Commit(oid=oid, parent=head, title=title, message=message, files=files, author=author,
                            date=_now())
            repo.commits[oid] = commit
            repo.branches[branch] = oid
            return commit

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (for assertions in tests)."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None, revision
            return dict(commit.files)

    def put_files(self, repo_id: str, files: dict[str, bytes], message: str = "test upload", owner="tester") -> str:
        """Commit ``files`` straight into the store (to set up broken repos the client would refuse to make)."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id, owner)
            return self._commit(repo, "main", dict(files), [], message, "", owner).oid


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers, head=head)

    def _user(self, required: bool = False) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            if required:
                raise HubError(401, "You must be authenticated to write to the Hub: pass a token.")
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if (repo.private or write) and user != repo.owner:
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ dispatch
    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self, head: bool = False) -> None:
        body = self._body() if self.command == "POST" else b""
        split = urlsplit(self.path)
        raw = [s for s in split.path.split("/") if s != ""]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        fault = self.hub._take_fault(self.command, unquote(split.path))
        if fault is not None and fault.status is not None:
            self._error_fault(fault.status, head)
            return
        try:
            with self.hub._lock:
                handled = self._route(raw, query, body, head, corrupt=fault is not None and fault.corrupt)
        except HubError as err:
            self._error(err, head=head)
            return
        if not handled:
            self.hub.unhandled.append((self.command, self.path))
            self._error(HubError(404, f"No route for {self.command} {split.path} in the loopback hub"), head=head)

    def _error_fault(self, status: int, head: bool) -> None:
        body = json.dumps({"error": f"Injected server error {status}"}).encode()
        self._send(status, body, {"Retry-After": "0", "X-Error-Message": "injected fault"}, head=head)

    def _route(self, raw: list[str], query: dict[str, str], body: bytes, head: bool, corrupt: bool) -> bool:
        method = self.command
        if raw[:1] == ["api"]:
            parts = raw[1:]
            if method == "POST" and parts == ["repos", "create"]:
                self._create_repo(json.loads(body or b"{}"))
                return True
            if method == "POST" and parts == ["validate-yaml"]:
                self._validate_yaml(json.loads(body or b"{}"))
                return True
            if method == "GET" and parts == ["agent-harnesses"]:  # the client's user-agent registry: keep it empty
                self._json(200, {"standardEnvVars": [], "harnesses": {}})
                return True
            if method == "GET" and parts == ["whoami-v2"]:
                user = self._user(required=True)
                self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": []})
                return True
            if len(parts) >= 3 and parts[0] == "models":
                repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
                return self._model_api(repo_id, parts[3:], query, body)
            return False
        if len(raw) >= 5 and raw[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(raw[0])}/{unquote(raw[1])}"
            self._resolve(repo_id, unquote(raw[3]), unquote("/".join(raw[4:])), head, corrupt)
            return True
        return False

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, payload: dict) -> None:
        user = self._user(required=True)
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "The loopback hub stores model repos only.")
        name, org = payload.get("name"), payload.get("organization") or user
        if not name:
            raise HubError(400, "Missing repo name")
        if org != user:
            raise HubError(403, f"You cannot create repos in the '{org}' namespace.")
        repo_id = f"{org}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        try:
            self.hub.create_repo(repo_id, owner=user, private=private)
        except HubError as err:
            self._json(err.status, {"error": err.message, "url": f"{self.hub.url}/{repo_id}"},
                       {"X-Error-Message": err.message})
            return
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if m:
            try:
                data = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                self._json(400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []})
                return
            if data is not None and not isinstance(data, dict):
                self._json(400, {"errors": [{"message": "The metadata must be a YAML mapping"}], "warnings": []})
                return
        self._json(200, {"errors": [], "warnings": []})

    def _model_api(self, repo_id: str, rest: list[str], query: dict[str, str], body: bytes) -> bool:
        method = self.command
        if method == "GET" and not rest:
            self._model_info(self._repo(repo_id), "main", query)
            return True
        if not rest:
            return False
        action, args = rest[0], rest[1:]
        if method == "GET" and action == "revision" and args:
            self._model_info(self._repo(repo_id), unquote("/".join(args)), query)
            return True
        if method == "GET" and action == "tree" and args:
            repo = self._repo(repo_id)
            commit = self._commit_at(repo, unquote(args[0]))
            path = unquote("/".join(args[1:])).strip("/")
            self._json(200, _tree(commit, path, query.get("recursive", "").lower() in ("1", "true")))
            return True
        if method == "POST" and action == "paths-info" and args:
            repo = self._repo(repo_id)
            commit = self._commit_at(repo, unquote("/".join(args)))
            form = parse_qs(body.decode()) if body else {}
            paths = form.get("paths", [])
            entries = [e for e in _tree(commit, "", True) if e["path"] in paths]
            self._json(200, entries)
            return True
        if method == "GET" and action == "refs":
            repo = self._repo(repo_id)
            ref = lambda kind, name, oid: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}  # noqa: E731
            self._json(200, {
                "branches": [ref("heads", n, o) for n, o in repo.branches.items()],
                "tags": [ref("tags", n, o) for n, o in repo.tags.items()],
                "converts": [],
            })
            return True
        if method == "GET" and action == "commits" and args:
            repo = self._repo(repo_id)
            commit = self._commit_at(repo, unquote("/".join(args)))
            self._json(200, [
                {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                 "authors": [{"user": c.author}]}
                for c in repo.history(commit.oid)
            ])
            return True
        if method == "POST" and action == "preupload" and args:
            repo = self._repo(repo_id, write=True)
            commit = repo.resolve(unquote("/".join(args)))
            files = json.loads(body or b"{}").get("files", [])
            out = []
            for f in files:
                existing = commit.files.get(f["path"]) if commit is not None else None
                out.append({
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                })
            self._json(200, {"files": out, "commitOid": commit.oid if commit else None})
            return True
        if method == "POST" and action == "commit" and args:
            self._commit_endpoint(repo_id, unquote("/".join(args)), query, body)
            return True
        if method == "POST" and action == "branch" and args:
            repo = self._repo(repo_id, write=True)
            branch = unquote("/".join(args))
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = self._commit_at(repo, start).oid
            self._json(200, {})
            return True
        if method == "POST" and action == "tag" and args:
            repo = self._repo(repo_id, write=True)
            commit = self._commit_at(repo, unquote("/".join(args)))
            tag = json.loads(body or b"{}").get("tag")
            if not tag:
                raise HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.oid
            self._json(200, {})
            return True
        return False

    def _model_info(self, repo: Repo, revision: str, query: dict[str, str]) -> None:
        commit = self._commit_at(repo, revision)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, data in sorted(commit.files.items()):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(data), blobId=git_blob_sha1(data))
            siblings.append(entry)
        card = _front_matter(commit.files.get("README.md"))
        tags = list(card.get("tags") or [])
        self._json(200, {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": card.get("library_name"),
            "cardData": card or None,
            "siblings": siblings,
        })

    def _commit_endpoint(self, repo_id: str, revision: str, query: dict[str, str], body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if query.get("create_pr"):
            raise HubError(400, "The loopback hub does not implement pull requests.")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[tuple[str, bool]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append((value["path"], False))
            elif key == "deletedFolder":
                deleted.append((value["path"], True))
            elif key == "lfsFile":
                raise HubError(400, "The loopback hub answered uploadMode 'regular'; LFS files are not accepted.")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "A commit needs a summary (commit message).")
        commit = self.hub._commit(
            repo,
            revision,
            added,
            deleted,
            header["summary"],
            header.get("description", ""),
            self._user(required=True),
            parent_commit=header.get("parentCommit"),
        )
        self._json(200, {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}",
            "commitMessage": commit.title,
            "pullRequestUrl": None,
        })

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool, corrupt: bool) -> None:
        try:
            repo = self._repo(repo_id)
            commit = self._commit_at(repo, revision)
        except HubError as err:
            self._error(err, head=head)
            return
        data = commit.files.get(path)
        if data is None:
            self._error(HubError(404, "Entry not found", "EntryNotFound", commit=commit.oid), head=head)
            return
        etag = git_blob_sha1(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{etag}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data = data[start : end + 1]
                status = 206
        if corrupt and not head:
            data = bytes(b ^ 0x5A for b in data)  # same length, different bytes: only a checksum notices
        self._send(status, data, {**headers, "Content-Length": str(len(data))}, head=head)


def _tree(commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree entries under ``path`` (files and directories), like ``/api/models/{id}/tree/{rev}/{path}``."""
    prefix = f"{path}/" if path else ""
    if path and path in commit.files:
        data = commit.files[path]
        return [{"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}]
    under = {p: d for p, d in commit.files.items() if p.startswith(prefix)}
    if path and not under:
        raise HubError(404, f"{path} does not exist at this revision", "EntryNotFound", commit=commit.oid)
    files, dirs = [], set()
    for p, data in under.items():
        rel = p[len(prefix) :]
        segments = rel.split("/")
        for i in range(1, len(segments)):
            if recursive or i == 1:
                dirs.add(prefix + "/".join(segments[:i]))
        if recursive or len(segments) == 1:
            files.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p})
    folders = [
        {"type": "directory", "oid": hashlib.sha1(("tree " + d).encode()).hexdigest(), "size": 0, "path": d}
        for d in sorted(dirs)
    ]
    return folders + sorted(files, key=lambda e: e["path"])


__all__ = ["Commit", "Fault", "HubError", "LoopbackHub", "Repo", "git_blob_sha1"]
