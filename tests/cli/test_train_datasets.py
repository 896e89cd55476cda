"""`vitlab train` end to end on the other data sources: CIFAR-100, an image folder, and `--download` from a
local HTTP server (no network). Tiny synthetic data in the official layouts; a few steps each."""

import hashlib
import http.server
import io
import json
import tarfile
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.data import cifar
from vitlab.model import VisionTransformer

TINY = ["--recipe", "tutorial", "--epochs", "1", "--batch-size", "16", "--model", "test", "--precision", "fp32",
        "--no-progress"]


def plain_top1(run_dir, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the saved model, normalising with the run's preprocessor_config.json by hand."""
    proc = json.loads((run_dir / "preprocessor_config.json").read_text())
    mean, std = (torch.tensor(proc[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
    model = VisionTransformer.from_pretrained(run_dir).eval()
    with torch.no_grad():
        pred = model((images.float() / 255 - mean) / std).argmax(1)
    return (pred == labels).float().mean().item()


def read_binary(path, label_bytes: int, label_byte: int):
    raw = np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, label_bytes + 3072)
    return torch.from_numpy(raw[:, label_bytes:].reshape(-1, 3, 32, 32).copy()), \
        torch.from_numpy(raw[:, label_byte].astype(np.int64))


def test_train_and_eval_cifar100(tmp_path, tiny_cifar, capsys):
    data = tiny_cifar(tmp_path / "c100", "cifar100", train=200, test=100)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "cifar100", "--data", str(data), "--out", str(run), *TINY]) == 0
    assert "test top-1" in capsys.readouterr().out
    model = VisionTransformer.from_pretrained(run)
    assert model.cfg.num_classes == 100
    assert VisionTransformer.read_class_names(run) == [f"fine_{i}" for i in range(100)]  # fine labels, file order
    record = json.loads((run / "train_config.json").read_text())
    assert record["data"]["dataset"] == "cifar100" and record["plan"]["total_steps"] == 200 // 16
    proc = json.loads((run / "preprocessor_config.json").read_text())
    assert proc["image_mean"] == pytest.approx(cifar.CIFAR100_MEAN) and proc["image_std"] == pytest.approx(
        cifar.CIFAR100_STD)  # the official CIFAR-100 statistics, not CIFAR-10's
    assert main(["eval", str(run), "--no-progress"]) == 0  # the data dir comes from the run's record
    res = json.loads((run / "eval.json").read_text())
    images, fine = read_binary(data / "test.bin", 2, 1)
    assert res["count"] == 100 and res["dataset"] == "cifar100"
    assert res["top1"] == pytest.approx(plain_top1(run, images, fine), abs=1e-6)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_top1"] == pytest.approx(res["top1"], abs=1e-6)  # training's evaluation = eval's


def write_folder(root, classes, per_class, seed):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # 32x32: decoding changes nothing
            pixels[..., c] = 255  # a class shows as a channel: learnable, and a distinct mean per channel
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_train_on_an_image_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the decoded-images cache
    classes = ["ant", "bee", "cow"]
    write_folder(tmp_path / "imgs" / "train", classes, 16, seed=0)
    write_folder(tmp_path / "imgs" / "test", classes, 4, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data", str(tmp_path / "imgs"), "--out", str(run), *TINY,
                 "--epochs", "3"]) == 0
    capsys.readouterr()
    assert VisionTransformer.read_class_names(run) == classes
    assert VisionTransformer.from_pretrained(run).cfg.num_classes == 3
    # an image folder has no known statistics: the mean/std are the training pixels'
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "imgs" / "train").rglob("*.png"))])
    proc = json.loads((run / "preprocessor_config.json").read_text())
    assert proc["image_mean"] == pytest.approx((pixels / 255).mean((0, 1, 2)), abs=1e-6)
    assert proc["image_std"] == pytest.approx((pixels / 255).std((0, 1, 2), ddof=1), abs=1e-6)
    assert any((tmp_path / "cache" / "vitlab" / "folders").glob("*.safetensors"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["step"] == 3 * (48 // 16)
    test_png = str(tmp_path / "imgs" / "test" / "bee" / "0.png")
    assert main(["predict", str(run), test_png, "--top-k", "3", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert sorted(pred["labels"]) == classes and sum(pred["probs"]) == pytest.approx(1, abs=1e-5)


@pytest.fixture
def cifar_server(tmp_path, tiny_cifar, monkeypatch):
    """An official-layout cifar-10-binary.tar.gz served over HTTP on 127.0.0.1 (a free port), with vitlab's
    URL and MD5 pointed at it. Yields the list of request paths the server saw."""
    files = tiny_cifar(tmp_path / "files")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(files.iterdir()):
            tar.add(f, arcname=f"cifar-10-batches-bin/{f.name}")
    payload = buf.getvalue()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path != "/kriz/cifar-10-binary.tar.gz":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(cifar, "URL", f"http://127.0.0.1:{server.server_address[1]}/kriz/")
    md5 = hashlib.md5(payload).hexdigest()
    monkeypatch.setattr(cifar, "CIFAR10", replace(cifar.CIFAR10, archives={**cifar.CIFAR10.archives,
                                                                            "binary": ("cifar-10-binary.tar.gz", md5)}))
    yield files, requests
    server.shutdown()
    server.server_close()
    thread.join()


def test_train_download(tmp_path, cifar_server, capsys):
    files, requests = cifar_server
    cache = tmp_path / "cache"
    assert main(["train", "--data", str(cache), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "--download" in capsys.readouterr().err  # without the flag: the error names it, nothing fetched
    assert requests == []
    assert main(["train", "--download", "--data", str(cache), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert requests == ["/kriz/cifar-10-binary.tar.gz"]
    unpacked = cache / "cifar-10-batches-bin"
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-batches-bin"]  # the archive is removed
    for f in files.iterdir():
        assert (unpacked / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "run" / "model.safetensors").is_file()
    # a second run reads the unpacked files: no second download
    assert main(["train", "--download", "--data", str(cache), "--out", str(tmp_path / "run2"), *TINY]) == 0
    assert requests == ["/kriz/cifar-10-binary.tar.gz"]


def test_download_of_a_corrupt_archive_is_one_line(tmp_path, cifar_server, monkeypatch, capsys):
    monkeypatch.setattr(cifar, "CIFAR10", replace(cifar.CIFAR10, archives={"binary": ("cifar-10-binary.tar.gz",
                                                                                      "0" * 32)}))
    cache = tmp_path / "cache"
    assert main(["train", "--download", "--data", str(cache), "--out", str(tmp_path / "run"), *TINY]) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().split("\n") if "\r" not in ln]  # less the tqdm bar
    assert len(lines) == 1 and "is corrupt (MD5" in lines[0] and lines[0].startswith("vitlab train: error:")
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-downloaded left to trust
