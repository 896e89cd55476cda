"""train-clip under torchrun (CPU, gloo, 2 processes): SigLIP's distributed loss (texts passed round the ring,
vitlab.clip.distributed) gives the weights one process gets on the whole global batch; `torchrun -m vitlab
train-clip` runs and reports once."""

from pathlib import Path

from _torchrun_clip import tiny_config

from helpers import torchrun
from vitlab.clip.train import train_clip
from vitlab.weights import load_state_dict

HELPER = Path(__file__).with_name("_torchrun_clip.py")


def test_siglip_on_two_processes_equals_one(tmp_path, tiny_cifar, assert_same_training):
    data = tiny_cifar(tmp_path / "cifar", train=128, test=40)
    one = train_clip(tiny_config("siglip", 16), out=tmp_path / "one", data=data, device="cpu", progress=False,
                     log=lambda s: None)
    done = torchrun(tmp_path, str(data), "two", "8", "siglip", script=(str(HELPER),))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_state_dict(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    # With each rank's own (local) SigLIP loss the weights differ by ~1e-2 here: the other rank's texts are
    # negatives of the global batch's loss.
    assert_same_training(a, b)
    assert one["steps"] == 16 and "16 (2 processes x 8, gloo)" in done.stdout + done.stderr


def test_torchrun_train_clip_cli(tmp_path, tiny_cifar):
    data = tiny_cifar(tmp_path / "cifar", train=64, test=20)
    done = torchrun(tmp_path, "train-clip", "--loss", "clip", "--data", str(data), "--time-budget",
                    "0", "--epochs", "1", "--batch-size", "8", "--width", "16", "--depth", "1", "--heads", "2",
                    "--text-width", "16", "--text-depth", "1", "--no-progress", "--out", "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("zero-shot accuracy on 20 CIFAR-10 test images") == 1  # rank 0 alone reports
    assert "clip: 4 steps, 64 images" in done.stdout  # 64 images of a global batch of 16
    assert (tmp_path / "run" / "model.safetensors").is_file()
