"""Helpers the tests share: a free TCP port, the torchrun launcher, the two-rank harness that runs a worker
in real gloo process groups, image files and the report check of `vitlab explain`. Fixtures (tiny_cifar,
cifar_dir, assert_same_training) are in conftest.py."""

import base64
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image

TINY_MODEL = ["--model", "test"]  # the variant table's 16-wide, 1-deep row: `vitlab train` in seconds
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cwd, *args, nproc=2, launcher=("--standalone",), script=("-m", "vitlab"), env=None, wait=True):
    """`torchrun [launcher] --nproc-per-node=N script args` with one thread per process: the finished process
    (stdout / stderr captured as text), or the running Popen with wait=False."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}", *script, *args]
    kw = dict(cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, text=True,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=300, **kw)


def join_ranks(rank: int, world: int, port: int) -> None:
    """In a worker: torchrun's environment for `rank` of `world` on localhost:port (env:// rendezvous), 1 thread."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def run_ranks(worker, out: Path, *args, world: int = 2) -> list:
    """Runs `worker(rank, world, port, out, *args)` in `world` processes (it calls `join_ranks`, then saves its
    result to out/rank{rank}.pt); returns the ranks' results in rank order."""
    mp.spawn(worker, args=(world, free_port(), str(out), *args), nprocs=world, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------- vitlab explain


def write_images(folder, n):
    """n random 24x20 PNGs written to `folder`; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def check_report(out, expected_pngs):
    """report.html in `out` embeds exactly the PNGs written there and links nothing outside; its text."""
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == expected_pngs
    page = (out / "report.html").read_text()
    embedded = {base64.b64decode(b) for b in DATA_URI.findall(page)}
    for name in pngs:  # every figure on disk is in the page, byte for byte
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data in embedded
    body = DATA_URI.sub('src="data:"', page).lower()
    assert "http" not in body and "<script" not in body and "<link" not in body and "url(" not in body
    assert set(re.findall(r'src="([^"]*)"', body)) == {"data:"}
    return page


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn afresh, in eval mode: matrices at 1/sqrt(fan_in) (activations keep their scale),
    norm gains around 1, biases around 0, bias tables at scale 1 (so a wrong index or mask shows)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("relative_position_bias_table"):
            p.copy_(noise)
        elif p.ndim > 1:
            p.copy_(noise * p[0].numel() ** -0.5)
        else:
            p.copy_(noise * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()
