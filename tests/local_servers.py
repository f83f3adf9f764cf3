"""Servers on 127.0.0.1 that tests point clients at, each recording what it is asked.

FakeHub stands in for the Hugging Face Hub (a test sets HF_ENDPOINT to its url). It serves model and dataset
repositories from local folders with the parts of the hub's HTTP interface that huggingface_hub's downloads use
(`[/datasets]/{repo}/resolve/{revision}/{file}`, `/api/{models,datasets}/{repo}[/revision/{revision}]`,
`/api/{models,datasets}/{repo}/tree/{revision}[/{path}][?recursive=true]`): enough for transformers' and datasets'
downloads and `hf download`. Anything else gets a 404 carrying the hub's error headers.

RecordingProxy stands in for an HTTP(S) proxy (a test sets HTTPS_PROXY to its url). It forwards nothing: it records
the first line of each request (`CONNECT host:443 HTTP/1.1`) and answers 502, as a proxy that cannot reach the
host would.

    with FakeHub(models={"org/name": folder}) as hub, RecordingProxy() as proxy:
        ...
        assert ("HEAD", "/org/name/resolve/main/config.json") in hub.requests
        assert proxy.hosts() == {"huggingface.co:443"}
"""

import hashlib
import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Server:
    def __init__(self, server: socketserver.TCPServer):
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops answering (idempotent): from then on, connecting to `url` is refused."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeHub(_Server):
    def __init__(self, models: dict[str, Path] | None = None, datasets: dict[str, Path] | None = None):
        self.repos = {("models", repo_id): Path(folder) for repo_id, folder in (models or {}).items()}
        self.repos.update({("datasets", repo_id): Path(folder) for repo_id, folder in (datasets or {}).items()})
        self.requests: list[tuple[str, str]] = []
        super().__init__(ThreadingHTTPServer(("127.0.0.1", 0), _hub_handler(self)))

    @staticmethod
    def commit(repo_id: str) -> str:
        """The repository's one commit: a 40-hex id derived from its name."""
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def files(self, kind: str, repo_id: str) -> list[str]:
        folder = self.repos[kind, repo_id]
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def repos_asked(self) -> set[str]:
        """The repositories whose files or API pages were requested."""
        return {repo_id for _, repo_id in self.repos if any(repo_id in path for _, path in self.requests)}


def _hub_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test's output clean
            pass

        def do_HEAD(self):
            self._answer(send_body=False)

        def do_GET(self):
            self._answer(send_body=True)

        def _answer(self, send_body: bool):
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.requests.append((self.command, path))
            if path == "/":
                return self._send(200, b"fake hub", {"Content-Type": "text/plain"}, send_body)
            for kind, repo_id in hub.repos:
                commit = hub.commit(repo_id)
                resolve = f"/{repo_id}/resolve/" if kind == "models" else f"/datasets/{repo_id}/resolve/"
                if path.startswith(resolve):
                    _, _, filename = path[len(resolve) :].partition("/")
                    return self._file(kind, repo_id, commit, filename, send_body)
                api = f"/api/{kind}/{repo_id}"
                if path in (api, f"{api}/revision/main", f"{api}/revision/{commit}"):
                    siblings = [{"rfilename": name} for name in hub.files(kind, repo_id)]
                    info = {"id": repo_id, "sha": commit, "private": False, "siblings": siblings}
                    return self._json(info, commit, send_body)
                for revision in ("main", commit):
                    tree = f"{api}/tree/{revision}"
                    if path == tree or path.startswith(tree + "/"):
                        under, recursive = path[len(tree) :].strip("/"), "recursive=true" in url.query.lower()
                        return self._tree(kind, repo_id, commit, under, recursive, send_body)
            self._error(404, "RepoNotFound", None, send_body)

        def _file(self, kind: str, repo_id: str, commit: str, filename: str, send_body: bool):
            file = hub.repos[kind, repo_id] / filename
            if not filename or not file.is_file():
                return self._error(404, "EntryNotFound", commit, send_body)
            content = file.read_bytes()
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(200, content, headers, send_body)

        def _tree(self, kind: str, repo_id: str, commit: str, under: str, recursive: bool, send_body: bool):
            """The folder `under`'s files and folders (all of them below it when `recursive`), as the hub lists them."""
            prefix = f"{under}/" if under else ""
            entries, folders = [], set()
            for name in hub.files(kind, repo_id):
                if not name.startswith(prefix):
                    continue
                parts = name[len(prefix) :].split("/")
                for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                    folders.add(prefix + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    content = (hub.repos[kind, repo_id] / name).read_bytes()
                    entries.append({"type": "file", "path": name, "size": len(content),
                                    "oid": hashlib.sha1(content).hexdigest()})  # fmt: skip
            entries += [{"type": "directory", "path": folder, "size": 0, "oid": "0" * 40} for folder in sorted(folders)]
            if under and not entries:
                return self._error(404, "EntryNotFound", commit, send_body)
            self._json(entries, commit, send_body)

        def _json(self, payload, commit: str, send_body: bool):
            headers = {"Content-Type": "application/json", "X-Repo-Commit": commit}
            self._send(200, json.dumps(payload).encode(), headers, send_body)

        def _error(self, status: int, code: str, commit: str | None, send_body: bool):
            headers = {"X-Error-Code": code, "X-Error-Message": f"{code} (fake hub)", "Content-Type": "text/plain"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, code.encode(), headers, send_body)

        def _send(self, status: int, body: bytes, headers: dict, send_body: bool):
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    return Handler


class RecordingProxy(_Server):
    def __init__(self):
        self.request_lines: list[str] = []
        super().__init__(socketserver.ThreadingTCPServer(("127.0.0.1", 0), _proxy_handler(self)))
        self._server.daemon_threads = True

    def hosts(self) -> set[str]:
        """The `host:port` (CONNECT) or URL each request asked for."""
        return {line.split()[1] for line in self.request_lines if len(line.split()) > 1}


def _proxy_handler(proxy: RecordingProxy):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            proxy.request_lines.append(self.rfile.readline().decode("latin-1").strip())
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # the request's headers
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    return Handler
