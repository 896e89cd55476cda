"""CIFAR-10 download by default: a missing dataset in vitlab's cache dir is fetched (MD5-checked, atomic, with a
progress bar) from a local http.server on 127.0.0.1 serving a small archive in the official layout; never
into a directory the user named, never with download=False; offline, one line naming VITLAB_DATA and the files."""

import hashlib
import http.server
import io
import socket
import tarfile
import threading
from dataclasses import replace

import pytest
import torch

from vitlab.data import cifar, load_cifar10, load_dataset
from vitlab.data.paths import cache_root, is_cache_dir
from vitlab.errors import VitlabError

ARCHIVE = "cifar-10-binary.tar.gz"


@pytest.fixture
def server(tmp_path, tiny_cifar, monkeypatch):
    """Serve a tiny official-layout archive; vitlab's URL and MD5 point at it, its cache dir is under tmp_path
    and VITLAB_DATA is unset. Yields (files served, request paths seen, the expected cache dir)."""
    files = tiny_cifar(tmp_path / "files")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(files.iterdir()):
            tar.add(f, arcname=f"cifar-10-batches-bin/{f.name}")
    payload, requests = buf.getvalue(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path != f"/mirror/{ARCHIVE}":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(cifar, "URL", f"http://127.0.0.1:{httpd.server_address[1]}/mirror/")
    monkeypatch.setattr(cifar, "CIFAR10", replace(cifar.CIFAR10, archives={
        **cifar.CIFAR10.archives, "binary": (ARCHIVE, hashlib.md5(payload).hexdigest())}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    yield files, requests, tmp_path / "xdg" / "vitlab" / "cifar10"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _reference(files, split):
    return load_cifar10(files, split, download=False)


def test_default_downloads_into_the_cache_once(server, capsys):
    files, requests, cache = server
    assert cache_root() / "cifar10" == cache and is_cache_dir(cache)
    ds = load_cifar10(split="test")  # no root, no VITLAB_DATA, no flag
    err = capsys.readouterr().err
    assert f"downloading {ARCHIVE}" in err and "100%" in err  # the progress bar
    assert requests == [f"/mirror/{ARCHIVE}"]
    ref = _reference(files, "test")
    assert torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels) and ds.classes == ref.classes
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-batches-bin"]  # unpacked, archive dropped
    for f in files.iterdir():
        assert (cache / "cifar-10-batches-bin" / f.name).read_bytes() == f.read_bytes()
    train = load_dataset("cifar10", split="train")  # the second load reads the unpacked files
    assert requests == [f"/mirror/{ARCHIVE}"] and len(train) == len(_reference(files, "train"))


def test_no_download_and_named_folders_are_never_fetched_into(server, tmp_path):
    _, requests, cache = server
    with pytest.raises(VitlabError, match=r"no CIFAR-10 data in .*--download"):
        load_cifar10(download=False)
    with pytest.raises(VitlabError, match="no CIFAR-10 data in"):
        load_cifar10(tmp_path / "mine")  # a folder the user named: a typo must not start a download
    assert requests == [] and not cache.exists()
    assert len(load_cifar10(tmp_path / "mine", "test", download=True)) == 32  # unless asked explicitly
    assert requests == [f"/mirror/{ARCHIVE}"]


def test_vitlab_data_pointing_at_nothing_is_an_error(server, tmp_path, monkeypatch):
    _, requests, _ = server
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "empty"))
    with pytest.raises(VitlabError, match=r"no CIFAR-10 data in .*empty.*VITLAB_DATA"):
        load_cifar10()
    assert requests == []


def offline(monkeypatch) -> int:
    """Point the download at a port nothing listens on: connection refused, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(cifar, "URL", f"http://127.0.0.1:{port}/mirror/")
    return port


def test_offline_is_one_line_naming_vitlab_data_and_the_files(server, monkeypatch):
    _, _, cache = server
    port = offline(monkeypatch)
    with pytest.raises(VitlabError) as err:
        load_cifar10()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot download http://127.0.0.1:{port}/mirror/{ARCHIVE}")
    assert "VITLAB_DATA" in msg and str(cache) in msg and ARCHIVE in msg
    for name in ("data_batch_1.bin", "data_batch_5.bin", "test_batch.bin", "batches.meta.txt"):
        assert name in msg
    assert not cache.exists() or not any(cache.rglob("*.tar.gz*"))  # no partial file left to trust


def test_a_corrupt_download_is_refused_and_leaves_nothing(server, monkeypatch):
    _, requests, cache = server
    monkeypatch.setattr(cifar, "CIFAR10", replace(cifar.CIFAR10, archives={"binary": (ARCHIVE, "0" * 32)}))
    with pytest.raises(VitlabError, match=r"is corrupt \(MD5 [0-9a-f]{32}, expected 0{32}\)"):
        load_cifar10()
    assert requests == [f"/mirror/{ARCHIVE}"] and (not cache.exists() or not any(cache.iterdir()))


def _bad_archive(kind, good: bytes) -> bytes:
    if kind == "junk":
        return b"not an archive at all"
    if kind == "truncated":
        return good[: len(good) // 2]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz"):
        pass  # a readable archive with no members
    return buf.getvalue()


def _served(files) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(files.iterdir()):
            tar.add(f, arcname=f"cifar-10-batches-bin/{f.name}")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["junk", "truncated", "member-less"])
def test_a_corrupt_archive_in_the_cache_is_moved_aside_and_fetched_again(server, kind):
    files, requests, cache = server
    cache.mkdir(parents=True)
    bad = _bad_archive(kind, _served(files))
    (cache / ARCHIVE).write_bytes(bad)
    ds = load_cifar10(split="test")
    ref = _reference(files, "test")
    assert torch.equal(ds.images, ref.images) and requests == [f"/mirror/{ARCHIVE}"]
    aside = [p for p in cache.iterdir() if p.name.startswith(f"{ARCHIVE}.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # kept, renamed, out of the way
    assert len(load_cifar10(split="train")) == len(_reference(files, "train"))  # healed: later runs just work


def test_a_corrupt_cached_archive_offline_is_one_line_naming_it(server, monkeypatch):
    _, _, cache = server
    cache.mkdir(parents=True)
    (cache / ARCHIVE).write_bytes(b"junk")
    offline(monkeypatch)
    with pytest.raises(VitlabError) as err:
        load_cifar10()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{cache / ARCHIVE} was corrupt (MD5 {hashlib.md5(b'junk').hexdigest()}")
    assert "moved aside" in msg and "VITLAB_DATA" in msg and "cannot download" in msg  # what to do
    assert not (cache / ARCHIVE).exists() and len(list(cache.glob(f"{ARCHIVE}.corrupt-*"))) == 1


def test_a_corrupt_archive_in_a_named_folder_is_named_and_never_moved(server, tmp_path):
    _, requests, _ = server
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ARCHIVE).write_bytes(b"junk")
    with pytest.raises(VitlabError) as err:
        load_cifar10(mine, download=True)
    msg = str(err.value)
    assert "\n" not in msg and str(mine / ARCHIVE) in msg and "corrupt" in msg and "left in place" in msg
    assert (mine / ARCHIVE).read_bytes() == b"junk" and sorted(p.name for p in mine.iterdir()) == [ARCHIVE]
    assert requests == []
