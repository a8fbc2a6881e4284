"""A small stand-in for the Hub's HTTP protocol, enough for huggingface_hub to create, commit to and download from a
model repository: whoami, repository creation and info, tree listing, preupload (every file inline), commit
(NDJSON, base64 contents) and resolve (HEAD and GET). Serves 127.0.0.1 only; tokens are fixed test values."""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

TOKENS = {"hf_test_write": ("alice", "write"), "hf_test_read": ("alice", "read")}


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.files: dict[str, bytes] = {}
        self.sha = hashlib.sha1(b"empty").hexdigest()


class StandInHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args):
        pass

    def _user(self):
        header = self.headers.get("Authorization", "")
        return TOKENS.get(header.removeprefix("Bearer ").strip())

    def _send(self, status: int, body=b"", headers=None, content_type="application/json"):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None):
        self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _readable(self, repo_id: str):
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and self._user() is None):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _writable(self, repo_id: str):
        repo = self._readable(repo_id)
        if repo is not None and (self._user() or (None, None))[1] != "write":
            self._error(403, "You don't have the rights to write to this repository")
            return None
        return repo

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        path = unquote(urlparse(self.path).path)
        self.server.requests.append((method, path))
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/validate-yaml", lambda: self._send(200, {"errors": [], "warnings": []})),
            ("POST", r"/api/repos/create", self._create),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                return handler(**{k: v for k, v in match.groupdict().items() if v is not None})
        self._error(404, f"no route for {method} {path}")

    def _whoami(self):
        user = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        name, role = user
        self._send(
            200, {"type": "user", "name": name, "auth": {"type": "access_token", "accessToken": {"role": role}}}
        )

    def _create(self):
        user = self._user()
        if user is None or user[1] != "write":
            return self._error(403 if user else 401, "You don't have the rights to create a repository")
        payload = json.loads(self._body())
        repo_id = f"{payload.get('organization') or user[0]}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        if repo_id in self.server.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self.server.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._send(200, {"url": url, "name": repo_id})

    def _info(self, repo, rev="main"):
        found = self._readable(repo)
        if found:
            siblings = [{"rfilename": name} for name in sorted(found.files)]
            self._send(
                200, {"id": repo, "modelId": repo, "sha": found.sha, "private": found.private, "siblings": siblings}
            )

    def _tree(self, repo, rev, sub=""):
        found = self._readable(repo)
        if found:
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(found.files.items())
                if name.startswith(sub)
            ]
            self._send(200, entries)

    def _preupload(self, repo, rev):
        if self._writable(repo):
            files = json.loads(self._body())["files"]
            self._send(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )

    def _commit(self, repo, rev):
        found = self._writable(repo)
        if not found:
            return
        for line in self._body().decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                found.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                found.files.pop(item["value"]["path"], None)
        found.sha = hashlib.sha1(json.dumps(sorted(found.files)).encode() + found.sha.encode()).hexdigest()
        self._send(200, {"commitUrl": f"{self.server.endpoint}/{repo}/commit/{found.sha}", "commitOid": found.sha})

    def _resolve(self, repo, rev, file):
        found = self._readable(repo)
        if not found:
            return
        if file not in found.files:
            return self._error(404, "Entry not found", "EntryNotFound")
        data = found.files[file]
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        self._send(200, data, {"X-Repo-Commit": found.sha, "ETag": etag}, content_type="application/octet-stream")


def start() -> StandInHub:
    server = StandInHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
