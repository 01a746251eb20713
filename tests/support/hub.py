"""A local stand-in for the Hugging Face Hub (127.0.0.1) and a tiny GPT-2 as a repository's files.

It speaks the part of the Hub's API that huggingface_hub's snapshot_download uses: the tree
listing of a revision (/api/models/<id>/tree/<rev>), the revision info of a branch
(/api/models/<id>/revision/<rev>), and each file by HEAD and GET (/<id>/resolve/<rev>/<file>, with
X-Repo-Commit, ETag and Content-Length); an unknown revision is a 404 with X-Error-Code
RevisionNotFound, as the Hub answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, tuple[str, dict[str, bytes]]]):
        """repos: id -> (commit, {path in the repository: bytes})"""
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def served_files(self) -> list[str]:
        return [
            p.split("/resolve/")[1] for m, p in self.requests if m == "GET" and "/resolve/" in p
        ]


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, *args):
        pass

    def _json(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _missing(self, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _repo(self, path: str, verb: str):
        """(id, commit, files, rest) for '<id>/<verb>/<revision>[/rest]', or None."""
        repo_id, _, tail = path.partition(f"/{verb}/")
        if repo_id not in self.server.repos:
            self._missing("RepoNotFound")
            return None
        commit, files = self.server.repos[repo_id]
        revision, _, rest = tail.partition("/")
        if revision not in (commit, "main"):
            self._missing("RevisionNotFound")
            return None
        return repo_id, commit, files, rest

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        with self.server.lock:
            self.server.requests.append((self.command, path))
        if path.startswith("/api/models/"):
            path = path[len("/api/models/") :]
            verb = "tree" if "/tree/" in path else "revision"
            found = self._repo(path, verb)
            if found is None:
                return
            repo_id, commit, files, _ = found
            if verb == "revision":
                siblings = [{"rfilename": name} for name in files]
                return self._json({"id": repo_id, "sha": commit, "siblings": siblings})
            return self._json([
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in files.items()
            ])  # fmt: skip
        found = self._repo(path.lstrip("/"), "resolve")
        if found is None:
            return
        _, commit, files, name = found
        if name not in files:
            return self._missing("EntryNotFound")
        data = files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)


def tiny_gpt2_files(out: Path) -> dict[str, bytes]:
    """A tiny GPT-2 (dalipipe/testing/checkpoints.py) as a hub repository's files, plus the kinds
    of files the fetch leaves out: Flax weights, and .bin weights beside the safetensors."""
    from dalipipe.testing.checkpoints import make_tiny_gpt2

    folder = make_tiny_gpt2(out, corpus=["a dog barks"] * 8)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "config.json" in files
    files["flax_model.msgpack"] = b"not read by any stage"
    files["pytorch_model.bin"] = b"the same weights, another format"
    files["README.md"] = b"# tiny\n"
    return files
