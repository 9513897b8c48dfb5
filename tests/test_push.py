"""``upcycle export --push`` against a local fake Hub (http.server on 127.0.0.1, via HF_ENDPOINT).

The fake implements what huggingface_hub 2.4 calls for ``create_repo`` + ``create_branch`` +
``upload_folder``: ``POST /api/repos/create``, ``POST /api/models/R/branch/B``,
``POST /api/validate-yaml``, ``POST /api/models/R/preupload/B`` (answering ``uploadMode: regular``
for every file, so contents travel base64-encoded inside the commit) and
``POST /api/models/R/commit/B`` (NDJSON, decoded and stored). LFS/xet uploads are not emulated.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

TOKEN = "hf_FAKEtokenThatMustNeverLeak0123456789"


class FakeHub:
    """Records requests; ``mode`` is "ok", "401", "drop", "echo-400" or "echo-500" (a commit error whose body
    and request-id header quote the request's Authorization header, as a misbehaving proxy might);
    ``drop_first`` drops that many commits."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.mode = "ok"
        self.drop_first = 0
        self.url = ""


def handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def reply(self, code: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def drop(self) -> None:
            self.close_connection = True  # no status line at all: the client sees a dropped connection

        def do_GET(self) -> None:
            hub.requests.append({"method": "GET", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": b""})
            self.reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?")[0]
            hub.requests.append({"method": "POST", "path": path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            if hub.mode == "drop" or (hub.drop_first and "/commit/" in path):
                if hub.drop_first and "/commit/" in path:
                    hub.drop_first -= 1
                return self.drop()
            if hub.mode.startswith("echo-") and "/commit/" in path:
                echoed = str(self.headers.get("Authorization"))  # in the body and the first line (request id)
                return self.reply(int(hub.mode[5:]), {"error": f"bad request: {echoed}"}, {"X-Request-Id": echoed})
            if hub.mode == "401" or self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/repos/create":
                request = json.loads(body)
                repo = f"{request['organization']}/{request['name']}"
                hub.repos[repo] = request
                return self.reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self.reply(200, {})
            parts = path.split("/")  # ['', 'api', 'models', user, name, verb, revision]
            if len(parts) == 7 and parts[2] == "models":
                repo, verb, revision = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
                if repo not in hub.repos:
                    return self.reply(404, {"error": "Repository not found"})
                if verb == "branch":
                    hub.files.setdefault((repo, revision), {})
                    return self.reply(200, {})
                if verb == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if verb == "commit":
                    return self.commit(repo, revision, body)
            self.reply(404, {"error": f"not implemented: {path}"})

        def commit(self, repo: str, revision: str, body: bytes) -> None:
            stored = hub.files.setdefault((repo, revision), {})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    assert value["encoding"] == "base64"
                    stored[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] != "header":
                    return self.reply(400, {"error": f"unexpected commit item {item['key']}"})
            oid = "c" * 40
            self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1; HF_ENDPOINT, HF_TOKEN and online mode set for the test only."""
    import huggingface_hub.constants as hub_constants

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(hub))
    hub.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache" / "token"))
    monkeypatch.setattr("upcycle.exporting.RETRY_WAIT", 0.0)
    yield hub
    server.shutdown()
    server.server_close()


def one_line_error(code: int, stderr: str) -> str:
    """The CLI failed with exactly one ``error:`` line (progress bars may precede it) and no traceback."""
    line = stderr.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: ") and stderr.count("error:") == 1, stderr
    assert "Traceback" not in stderr
    return line


def local_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def assert_no_token(stdout: str, stderr: str, folder: Path) -> None:
    assert TOKEN not in stdout + stderr
    for path in folder.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_uploads_every_file(tmp_path, moe_folder, fake_hub, run_cli):
    out = tmp_path / "hub"
    code, stdout, stderr = run_cli("export", moe_folder, "-o", out, "--repo-id", "me/tiny-moe", "--push",
                                   "--private", "--revision", "dev", "--max-shard-size", "150KB")
    assert code == 0, stderr
    assert fake_hub.repos["me/tiny-moe"]["visibility"] == "private"
    uploaded = fake_hub.files[("me/tiny-moe", "dev")]
    expected = local_files(out)
    assert uploaded == expected and "README.md" in uploaded and "model.safetensors.index.json" in uploaded
    assert sum(name.endswith(".safetensors") for name in uploaded) >= 2
    commits = [r for r in fake_hub.requests if r["path"].endswith("/commit/dev")]
    assert len(commits) == 1 and commits[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert f"uploaded: {fake_hub.url}/me/tiny-moe/commit/" in stdout
    assert_no_token(stdout, stderr, out)


def test_push_401_names_the_fix_and_keeps_output(tmp_path, moe_folder, fake_hub, run_cli):
    fake_hub.mode = "401"
    out = tmp_path / "hub"
    code, stdout, stderr = run_cli("export", moe_folder, "-o", out, "--repo-id", "me/tiny-moe", "--push")
    one_line_error(code, stderr)
    assert "401" in stderr and "hf auth login" in stderr and "HF_TOKEN" in stderr and "Traceback" not in stderr
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert not fake_hub.files
    assert_no_token(stdout, stderr, out)


def test_push_dropped_connection_retries_then_fails_clearly(tmp_path, moe_folder, fake_hub, run_cli):
    from upcycle.exporting import RETRIES

    fake_hub.mode = "drop"
    out = tmp_path / "hub"
    code, stdout, stderr = run_cli("export", moe_folder, "-o", out, "--repo-id", "me/tiny-moe", "--push")
    one_line_error(code, stderr)
    assert f"after {RETRIES} attempts" in stderr and "hf upload me/tiny-moe" in stderr
    creates = [r for r in fake_hub.requests if r["path"] == "/api/repos/create"]
    assert len(creates) == RETRIES
    assert (out / "model.safetensors").is_file() and set(local_files(out)) >= {"config.json", "README.md"}
    assert_no_token(stdout, stderr, out)


def test_push_recovers_from_one_dropped_commit(tmp_path, moe_folder, fake_hub):
    from upcycle.exporting import export

    fake_hub.drop_first = 1
    out = tmp_path / "hub"
    result = export(moe_folder, out, repo_id="me/tiny-moe", push=True, progress=False)
    assert result.url and fake_hub.files[("me/tiny-moe", "main")] == local_files(out)
    assert sum("/commit/" in r["path"] for r in fake_hub.requests) == 2


def test_push_without_token_or_offline(tmp_path, moe_folder, fake_hub, run_cli, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_TOKEN")
    code, _, stderr = run_cli("export", moe_folder, "-o", tmp_path / "a", "--repo-id", "me/x", "--push")
    assert "hf auth login" in one_line_error(code, stderr) and not (tmp_path / "a").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    code, stdout, stderr = run_cli("export", moe_folder, "-o", tmp_path / "b", "--repo-id", "me/x", "--push")
    assert "HF_HUB_OFFLINE" in one_line_error(code, stderr) and not (tmp_path / "b").exists()
    assert not fake_hub.requests and TOKEN not in stdout + stderr


def test_push_uploads_exactly_what_export_wrote_and_dry_run_lists_it(tmp_path, moe_folder, fake_hub, run_cli):
    out = tmp_path / "hub"
    assert run_cli("export", moe_folder, "-o", out)[0] == 0
    (out / "notes.txt").write_text("my notes, not for the Hub")
    (out / "private").mkdir()
    (out / "private" / "secret.json").write_text("{}")
    code, dry, stderr = run_cli("export", moe_folder, "--dry-run", "--repo-id", "me/tiny-moe", "--push")
    assert code == 0, stderr
    listed = {line.split()[-1] for line in dry.splitlines()[1:] if line.startswith("  ")}
    code, stdout, stderr = run_cli("export", moe_folder, "-o", out, "--force", "--repo-id", "me/tiny-moe", "--push")
    assert code == 0, stderr
    uploaded = fake_hub.files[("me/tiny-moe", "main")]
    written = json.loads((out / ".upcycle-manifest.json").read_text())["files"]
    assert set(uploaded) == set(written) == listed and "README.md" in listed
    assert "notes.txt" not in uploaded and "private/secret.json" not in uploaded
    assert (out / "notes.txt").is_file()
    assert uploaded == {name: (out / name).read_bytes() for name in written}


@pytest.mark.parametrize("mode", ["echo-400", "echo-500"])
def test_an_http_error_never_echoes_the_token(tmp_path, moe_folder, fake_hub, run_cli, mode):
    fake_hub.mode = mode
    out = tmp_path / "hub"
    code, stdout, stderr = run_cli("export", moe_folder, "-o", out, "--repo-id", "me/tiny-moe", "--push")
    line = one_line_error(code, stderr)
    assert ("rejected" in line) if mode == "echo-400" else ("HTTP 500" in line)
    assert "hf upload me/tiny-moe" in line
    assert_no_token(stdout, stderr, out)
