"""`vitlab demo` as a real server, spoken to over HTTP (no browser): a --host other than loopback warns in one line,
--auth keeps the page and the upload route shut until Gradio's login, uploads over --max-upload-mb (default 5) are
refused with HTTP 413 and leave nothing, and the private uploads folder is gone once the server exits, by SIGTERM
or by Ctrl-C. The server's TMPDIR is a folder of the test's own, so whatever it leaves there is seen."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port

httpx = pytest.importorskip("httpx")  # gradio's own dependency: present wherever gradio is
pytest.importorskip("gradio")
STARTUP_S = 180  # importing gradio on a busy 2-core machine takes a while
MB = 2**20


class Server:
    """`vitlab demo RUN --port P ARGS` with its own TMPDIR; stdout and stderr kept apart."""

    def __init__(self, run: Path, tmp_path: Path, *args: str) -> None:
        self.port, self.tmp = free_port(), tmp_path / "tmp"
        self.tmp.mkdir()
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "TMPDIR": str(self.tmp),
               "MPLCONFIGDIR": str(tmp_path / "mpl")}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "vitlab", "demo", str(run), "--port", str(self.port),
                                          *args], stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"vitlab demo exited with {self.proc.returncode}:\n{self.err.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                pytest.fail(f"vitlab demo did not listen within {STARTUP_S} s")
            time.sleep(0.5)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def uploads_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("vitlab-demo-uploads-*"))

    def upload(self, path: Path) -> httpx.Response:
        with path.open("rb") as f:
            return self.client.post("/gradio_api/upload", files={"files": (path.name, f, "image/png")})

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def servers():
    started: list[Server] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


def blob(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_an_exposed_demo_warns_asks_for_the_password_and_caps_uploads(demo_run, tmp_path, servers):
    server = Server(demo_run(), tmp_path, "--host", "0.0.0.0", "--auth", "alice:s3cret", "--max-upload-mb", "1")
    servers.append(server)
    warnings = [line for line in server.err.read_text().splitlines() if "--host" in line]
    assert len(warnings) == 1 and warnings[0].startswith("vitlab demo: warning: --host 0.0.0.0 serves the page to "
                                                         "the network"), server.err.read_text()
    assert "--auth USER:PASS" not in warnings[0]  # it is given

    small = blob(tmp_path / "small.png", 100_000)
    assert server.client.get("/config").status_code == 401  # the page's config, before the login
    assert server.upload(small).status_code == 401
    assert server.client.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
    assert server.client.get("/config").status_code == 401
    assert server.client.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
    assert server.client.get("/config").status_code == 200

    [uploads] = server.uploads_dirs()
    done = server.upload(small)
    assert done.status_code == 200, done.text
    [kept] = map(Path, done.json())
    assert kept.is_relative_to(uploads) and kept.read_bytes() == small.read_bytes()
    big = server.upload(blob(tmp_path / "big.png", 2 * MB))  # over --max-upload-mb 1
    assert big.status_code == 413 and "maximum allowed size" in big.text
    files = [p for p in uploads.rglob("*") if p.is_file()]
    assert kept in files and all(p.stat().st_size < 2 * MB for p in files)  # the refused upload left nothing

    assert server.stop(signal.SIGTERM) == 143
    assert not uploads.exists() and server.uploads_dirs() == []


def test_a_local_demo_is_quiet_open_and_capped_at_5_mb_by_default(demo_run, tmp_path, servers):
    server = Server(demo_run(), tmp_path)
    servers.append(server)
    assert "serves the page to the network" not in server.err.read_text()
    assert server.client.get("/config").status_code == 200  # no --auth: no login
    [uploads] = server.uploads_dirs()
    assert server.upload(blob(tmp_path / "under.png", 4 * MB)).status_code == 200
    assert server.upload(blob(tmp_path / "over.png", 6 * MB)).status_code == 413
    assert [s for p in uploads.rglob("*") if p.is_file() and (s := p.stat().st_size) >= 4 * MB] == [4 * MB]

    assert server.stop(signal.SIGINT) == 130  # Ctrl-C
    assert not uploads.exists() and server.uploads_dirs() == []


@pytest.mark.parametrize("auth", ["alice", ":pw", "alice:"])
def test_a_malformed_auth_is_one_line(demo_run, auth, capsys):
    from vitlab.cli import main

    assert main(["demo", str(demo_run()), f"--auth={auth}"]) == 2
    assert capsys.readouterr().err == "vitlab demo: error: --auth must be USER:PASS, both non-empty\n"
