"""A test double of the Hugging Face Hub's HTTP API, for the test suite only: it is NOT the Hub.

:class:`LoopbackHub` is a ``pytest_httpserver.HTTPServer`` on 127.0.0.1 keeping model repos in memory as commit
histories (each commit a full snapshot; branches and tags point at commits). ``huggingface_hub`` pointed at
:attr:`~LoopbackHub.url` talks real HTTP to it. It answers only the endpoints the client calls in these tests (repo
creation, model info, tree, preupload -- always ``"regular"``, no LFS --, commit, branch, tag, and ``resolve`` with
``ETag`` = git blob sha1, ``X-Repo-Commit``, ``Content-Length``); any other request fails the test. Errors carry the
Hub's ``X-Error-Code`` so the client raises its usual exceptions; writes need a known token; a private repo is
visible to its owner only. :meth:`~LoopbackHub.fault` makes requests fail or serve corrupted bytes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
from dataclasses import dataclass, field

from huggingface_hub import ModelCard
from huggingface_hub.utils.sha import git_hash
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo_id>[^/]+/[^/]+)"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit  # commit: X-Repo-Commit of a missing entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, bytes]


@dataclass
class Repo:
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:  # a branch, a tag or a full commit sha
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, oid: str | None) -> list[Commit]:  # newest first
        return [] if oid is None else [self.commits[oid], *self.history(self.commits[oid].parent)]


@dataclass
class Fault:
    status: int | None = None  # answer this HTTP error instead
    corrupt: bool = False  # or flip the bytes of what is served
    methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    match: str = ""  # substring of the request path


class LoopbackHub(HTTPServer):
    def __init__(self, tokens: dict[str, str]):
        super().__init__(host="127.0.0.1")
        self.no_handler_status_code = 404
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.active_fault: Fault | None = None
        self._route(("POST",), r"/api/repos/create", self._create_repo)
        self._route(("POST",), r"/api/validate-yaml", self._validate_yaml)
        self._route(("GET",), rf"/api/models/{REPO}(?:/revision/(?P<revision>.+))?", self._model_info)
        self._route(("GET",), rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)", self._tree)
        self._route(("POST",), rf"/api/models/{REPO}/preupload/(?P<revision>.+)", self._preupload)
        self._route(("POST",), rf"/api/models/{REPO}/commit/(?P<revision>.+)", self._commit)
        self._route(("POST",), rf"/api/models/{REPO}/branch/(?P<branch>.+)", self._branch)
        self._route(("POST",), rf"/api/models/{REPO}/tag/(?P<revision>.+)", self._tag)
        self._route(("GET", "HEAD"), rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self._resolve)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @contextlib.contextmanager
    def fault(self, **kwargs):
        """``with hub.fault(status=500): ...`` or ``with hub.fault(corrupt=True, match="plan.json"): ...``."""
        self.active_fault = Fault(**kwargs)
        try:
            yield self.active_fault
        finally:
            self.active_fault = None

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(revision).files)

    def put_files(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Commit ``files`` straight into the store (to set up broken repos the client would refuse to make)."""
        repo = self.repos.get(repo_id) or self.create(repo_id, "tester")
        return self.commit(repo, "main", files, [], "test upload").oid

    def create(self, repo_id: str, owner: str, private: bool = False) -> Repo:
        repo = self.repos[repo_id] = Repo(owner, private)
        self.commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit")
        return repo

    def commit(self, repo: Repo, branch: str, added: dict, deleted: list, title: str, parent=None) -> Commit:
        head = repo.branches.get(branch)
        if parent is not None and parent != head:
            raise HubError(412, f"A commit has happened since {parent}")
        files = dict(repo.commits[head].files) if head else {}
        for path in deleted:
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        files.update(added)
        oid = secrets.token_hex(20)
        repo.commits[oid] = Commit(oid, head, title, files)
        repo.branches[branch] = oid
        return repo.commits[oid]

    def dispatch(self, request: Request) -> Response:
        fault = self.active_fault
        if fault is None or request.method not in fault.methods or fault.match not in request.path:
            return super().dispatch(request)
        if fault.status is not None:
            return _error(HubError(fault.status, "injected fault"), {"Retry-After": "0"})
        response = super().dispatch(request)
        response.set_data(bytes(b ^ 0x5A for b in response.get_data()))  # same length: only a checksum notices
        return response

    def _route(self, methods: tuple[str, ...], pattern: str, endpoint) -> None:
        def respond(request: Request) -> Response:
            try:
                return endpoint(request, **re.fullmatch(pattern, request.path).groupdict())
            except HubError as err:
                return _error(err)

        for method in methods:
            self.expect_request(re.compile(f"^{pattern}$"), method=method).respond_with_handler(respond)

    def _user(self, request: Request, required: bool = False) -> str | None:
        auth = request.headers.get("Authorization")
        if auth is None and not required:
            return None
        user = self.tokens.get((auth or "").removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, request: Request, repo_id: str, write: bool = False) -> Repo:
        user = self._user(request, required=write)
        repo = self.repos.get(repo_id)
        if repo is None or ((repo.private or write) and user != repo.owner):
            raise HubError(401 if repo and user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _create_repo(self, request: Request) -> Response:
        user, payload = self._user(request, required=True), request.get_json()
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You cannot create repos in the '{repo_id.split('/')[0]}' namespace.")
        if repo_id not in self.repos:
            self.create(repo_id, user, private=payload.get("visibility") == "private")
            return _json({"url": f"{self.url}/{repo_id}", "name": repo_id})
        return _json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409)

    def _validate_yaml(self, request: Request) -> Response:
        ModelCard(request.get_json()["content"])  # raises (-> the test fails) on invalid front matter
        return _json({"errors": [], "warnings": []})

    def _model_info(self, request: Request, repo_id: str, revision: str | None) -> Response:
        repo = self._repo(request, repo_id)
        commit = repo.resolve(revision or "main")
        readme = commit.files.get("README.md")
        card = ModelCard(readme.decode()).data.to_dict() if readme else {}
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        return _json({"id": repo_id, "author": repo.owner, "sha": commit.oid, "private": repo.private,
                      "siblings": siblings, "cardData": card, "tags": card.get("tags", []),
                      "library_name": card.get("library_name")})

    def _tree(self, request: Request, repo_id: str, revision: str) -> Response:
        files = self._repo(request, repo_id).resolve(revision).files
        return _json([{"type": "file", "path": p, "oid": git_hash(d), "size": len(d)} for p, d in files.items()])

    def _preupload(self, request: Request, repo_id: str, revision: str) -> Response:
        repo = self._repo(request, repo_id, write=True)
        files = repo.resolve(revision).files if revision in repo.branches else {}
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_hash(files[f["path"]]) if f["path"] in files else None}
                  for f in request.get_json()["files"]]
        return _json({"files": answer})

    def _commit(self, request: Request, repo_id: str, revision: str) -> Response:
        repo = self._repo(request, repo_id, write=True)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        ops = [json.loads(line) for line in request.get_data().splitlines() if line.strip()]
        header = next(op["value"] for op in ops if op["key"] == "header")
        added = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in ops if op["key"] == "file"}
        deleted = [op["value"]["path"] for op in ops if op["key"] == "deletedFile"]
        if len(added) + len(deleted) + 1 != len(ops):
            raise HubError(400, f"Unsupported commit operations: {sorted({op['key'] for op in ops})}")
        commit = self.commit(repo, revision, added, deleted, header["summary"], header.get("parentCommit"))
        return _json({"commitOid": commit.oid, "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}"})

    def _branch(self, request: Request, repo_id: str, branch: str) -> Response:
        repo = self._repo(request, repo_id, write=True)
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = (request.get_json(silent=True) or {}).get("startingPoint") or "main"
        repo.branches[branch] = repo.resolve(start).oid
        return _json({})

    def _tag(self, request: Request, repo_id: str, revision: str) -> Response:
        repo = self._repo(request, repo_id, write=True)
        repo.tags[request.get_json()["tag"]] = repo.resolve(revision).oid
        return _json({})

    def _resolve(self, request: Request, repo_id: str, revision: str, path: str) -> Response:
        commit = self._repo(request, repo_id).resolve(revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.oid)
        data = commit.files[path]
        headers = {"ETag": f'"{git_hash(data)}"', "X-Repo-Commit": commit.oid, "Content-Length": str(len(data))}
        return Response(data, headers=headers, content_type="application/octet-stream")


def _json(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(data), status=status, headers=headers, content_type="application/json")


def _error(err: HubError, headers: dict | None = None) -> Response:
    named = {"X-Error-Message": str(err), "X-Error-Code": err.code, "X-Repo-Commit": err.commit, **(headers or {})}
    return _json({"error": str(err)}, err.status, {k: v for k, v in named.items() if v is not None})
