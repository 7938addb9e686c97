"""A small Hugging Face Hub for tests, served on 127.0.0.1 from memory.

It implements the endpoints that huggingface_hub's `whoami`, `create_repo`, `upload_folder`/`create_commit`,
`repo_info`/`model_info`, `list_repo_tree` and `hf_hub_download`/`snapshot_download` (so also diffusers'
`from_pretrained`) call, with the Hub's status codes and `X-Error-Code` headers. Point huggingface_hub
at it with `HF_ENDPOINT=hub.endpoint` (read when huggingface_hub is imported: use it for subprocesses) or,
in-process, by setting `huggingface_hub.constants.ENDPOINT`.

Large files take the Hub's LFS path, as for users: preupload answers "lfs" for what `.gitattributes` tracks
(`*.safetensors`, `*.bin`) or what is 10 MB or more, and huggingface_hub then asks the LFS batch endpoint where to
upload, PUTs the bytes there, has them verified, and commits an `lfsFile` naming them by SHA-256; the others go
inline in the commit. The Xet protocol that huggingface_hub prefers where `hf_xet` is installed is a Rust client's
own (chunks to a content-addressed store) and is not stood in: tests set HF_HUB_DISABLE_XET=1 (conftest.py), the path
of a user without `hf_xet`. Simplifications: no branches other than `main`, and revisions are `main` or a commit id.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlparse

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_PATTERNS = ("*.safetensors", "*.bin")  # what GITATTRIBUTES tracks
LFS_SIZE = 10 * 1000 * 1000  # the Hub takes a file this large through LFS whatever its name


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: Dict[str, bytes]
    lfs: Dict[str, str] = field(default_factory=dict)  # path -> SHA-256, for the files stored as LFS objects


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: List[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Optional[Commit]:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class LocalHub:
    """`LocalHub(tokens={"hf_abc": ("alice", "write")})`; `with hub:` serves on a free port."""

    def __init__(self, tokens: Dict[str, Tuple[str, str]]):
        self.tokens = tokens
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Tuple[str, str, Optional[str]]] = []  # (method, path, user or None)
        self.unhandled: List[str] = []
        self.commit_gate = threading.Event()  # clear it to hold commits (tests of background pushes)
        self.commit_gate.set()
        self.commit_delay = 0.0  # seconds each commit takes (a slow link, for benchmarks)
        self.lfs: Dict[str, bytes] = {}  # LFS objects uploaded, by SHA-256
        self.lfs_verified: List[str] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.commit_gate.set()
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str) -> Dict[str, bytes]:
        return dict(self.repos[repo_id].head.files)

    def lfs_files(self, repo_id: str) -> List[str]:
        """The paths of the repo's head that are LFS objects (committed as `lfsFile`)."""
        return sorted(self.repos[repo_id].head.lfs)

    # ---- the Hub's behaviour, called by the handler

    def user_of(self, authorization: Optional[str]) -> Optional[Tuple[str, str]]:
        if authorization and authorization.startswith("Bearer "):
            return self.tokens.get(authorization[len("Bearer "):])
        return None

    def new_commit(self, repo: Repo, message: str, files: Dict[str, bytes], lfs: Optional[Dict[str, str]] = None) -> Commit:
        with self._lock:
            oid = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{message}".encode()).hexdigest()
            commit = Commit(oid, message, files, dict(lfs or {}))
            repo.commits.append(commit)
            return commit


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- plumbing

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[dict] = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, code: Optional[str] = None):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _user(self):
        user = self.hub.user_of(self.headers.get("Authorization"))
        self.hub.requests.append((self.command, self.path, user[0] if user else None))
        return user

    def _readable_repo(self, repo_id: str, user) -> Optional[Repo]:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or user[0] != repo.owner)):
            # the Hub answers 401 for a repo it will not show, whether or not it exists
            self._error(401 if user is None else 404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _writable_repo(self, repo_id: str, user) -> Optional[Repo]:
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self._readable_repo(repo_id, user)
        if repo is None:
            return None
        if user[1] != "write" or user[0] != repo.owner:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def _dispatch(self, routes):
        path = urlparse(self.path).path
        user = self._user()
        for pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if m:
                return handler(user, **{k: unquote(v) for k, v in m.groupdict().items() if v is not None})
        self.hub.unhandled.append(f"{self.command} {self.path}")
        self._error(404, f"not implemented by the test Hub: {self.command} {path}")

    # ---- routes

    def do_GET(self):
        self._dispatch([
            (r"/api/whoami-v2", self.whoami),
            (r"/api/agent-harnesses", self.agent_harnesses),
            (rf"/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?", self.model_info),
            (rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<prefix>.+))?", self.tree),
            (rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", self.resolve),
        ])

    do_HEAD = do_GET

    def do_POST(self):
        self._dispatch([
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", self.validate_yaml),
            (rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", self.preupload),
            (rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", self.commit),
            (r"/(?P<repo>[\w.-]+/[\w.-]+?)\.git/info/lfs/objects/batch", self.lfs_batch),
            (r"/lfs-verify/(?P<oid>[0-9a-f]{64})", self.lfs_verify),
        ])

    def do_PUT(self):
        self._dispatch([(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload)])

    def whoami(self, user):
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": user[0], "fullname": user[0], "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user[1]}}})

    def agent_harnesses(self, user):  # huggingface_hub's user-agent registry: an empty one
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self, user):
        payload = json.loads(self._body())
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        if user[1] != "write":
            return self._error(403, "You don't have the rights to create a model under this namespace")
        owner = payload.get("organization") or user[0]
        if owner != user[0]:
            return self._error(403, f"You don't have the rights to create a model under the namespace {owner}")
        repo_id = f"{owner}/{payload['name']}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.endpoint}/{repo_id}"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.hub.repos[repo_id] = Repo(repo_id, owner, private)
        self.hub.new_commit(repo, "initial commit", {".gitattributes": GITATTRIBUTES})
        self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, user):
        content = json.loads(self._body())["content"]
        m = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return self._json(400, {"error": f"Invalid metadata in README.md: {e}"})
        if not isinstance(meta, dict):
            return self._json(400, {"error": "Invalid metadata in README.md: not a mapping"})
        self._json(200, {"warnings": []})

    def preupload(self, user, repo, revision):
        if self._writable_repo(repo, user) is None:
            return
        files = json.loads(self._body())["files"]

        def mode(f):
            lfs = f.get("size", 0) >= LFS_SIZE or any(fnmatch.fnmatch(f["path"].split("/")[-1], p) for p in LFS_PATTERNS)
            return "lfs" if lfs else "regular"

        self._json(200, {"files": [{"path": f["path"], "uploadMode": mode(f), "shouldIgnore": False} for f in files]})

    def lfs_batch(self, user, repo):
        if self._writable_repo(repo, user) is None:
            return
        request = json.loads(self._body())
        if request.get("operation") != "upload" or request.get("hash_algo", "sha256") != "sha256":
            return self._error(400, "the test Hub takes LFS uploads of sha256 objects only")
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:  # one the Hub already holds needs no upload
                entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, user, oid):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "the uploaded bytes do not hash to the object's oid")
        self.hub.lfs[oid] = data
        self._send(200)

    def lfs_verify(self, user, oid):
        request = json.loads(self._body())
        data = self.hub.lfs.get(oid)
        if data is None or len(data) != request.get("size"):
            return self._error(404, f"LFS object {oid} not found")
        self.hub.lfs_verified.append(oid)
        self._json(200, {"success": True})

    def commit(self, user, repo, revision):
        target = self._writable_repo(repo, user)
        if target is None:
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files, lfs = dict(target.head.files), dict(target.head.lfs)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.pop(value["path"], None)
            elif key == "lfsFile":
                data = self.hub.lfs.get(value["oid"])
                if data is None or value.get("algo", "sha256") != "sha256":
                    return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]], lfs[value["path"]] = data, value["oid"]
            elif key == "deletedFile":
                files.pop(value["path"], None)
                lfs.pop(value["path"], None)
            elif key == "deletedFolder":
                inside = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(inside)}
                lfs = {p: o for p, o in lfs.items() if not p.startswith(inside)}
            elif key != "header":
                return self._error(400, f"the test Hub does not take {key!r} operations")
        self.hub.commit_gate.wait(timeout=60)
        time.sleep(self.hub.commit_delay)
        commit = self.hub.new_commit(target, header["summary"], files, lfs)
        self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.hub.endpoint}/{repo}/commit/{commit.oid}"})

    def _commit_of(self, repo_id: str, revision: Optional[str], user) -> Optional[Tuple[Repo, Commit]]:
        repo = self._readable_repo(repo_id, user)
        if repo is None:
            return None
        commit = repo.at(revision or "main")
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return repo, commit

    def model_info(self, user, repo, revision=None):
        found = self._commit_of(repo, revision, user)
        if found is None:
            return
        repo_obj, commit = found
        self._json(200, {"_id": repo, "id": repo, "modelId": repo, "author": repo_obj.owner, "sha": commit.oid,
                         "private": repo_obj.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                         "tags": [], "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def tree(self, user, repo, revision, prefix=None):
        found = self._commit_of(repo, revision, user)
        if found is None:
            return
        recursive = parse_qs(urlparse(self.path).query).get("recursive", ["false"])[0].lower() in ("true", "1")
        base = (prefix.rstrip("/") + "/") if prefix else ""
        entries, folders = [], set()
        for path, data in sorted(found[1].files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):].split("/")
            for depth in range(1, len(rest)):
                folder = base + "/".join(rest[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": git_blob_id(folder.encode()), "size": 0, "path": folder})
            if recursive or len(rest) == 1:
                entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
                if path in found[1].lfs:
                    entry["lfs"] = {"oid": found[1].lfs[path], "size": len(data), "pointerSize": 134}
                entries.append(entry)
        self._json(200, entries)

    def resolve(self, user, repo, revision, filename):
        found = self._commit_of(repo, revision, user)
        if found is None:
            return
        data = found[1].files.get(filename)
        if data is None:
            return self._error(404, f"Entry not found: {filename}", "EntryNotFound")
        headers = {"X-Repo-Commit": found[1].oid, "ETag": f'"{git_blob_id(data)}"'}
        if filename in found[1].lfs:  # as the Hub names an LFS file: by its SHA-256
            headers.update({"X-Linked-Etag": f'"{found[1].lfs[filename]}"', "X-Linked-Size": str(len(data))})
        self._send(200, data, headers, content_type="application/octet-stream")


if __name__ == "__main__":  # serve until killed: python tests/hub_server.py TOKEN USER [COMMIT_DELAY_S]
    import sys

    with LocalHub({sys.argv[1]: (sys.argv[2], "write")}) as served:
        served.commit_delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
        print(served.endpoint, flush=True)
        threading.Event().wait()
