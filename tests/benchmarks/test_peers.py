"""The peers benchmark's plumbing: the plain loop trains each peer, stops by the clock, and the peers file holds
one entry per run with vitlab's lead over the timm ViT. Tiny data and 2 steps: numbers, not accuracy."""

import json

import cifar10_time_to_accuracy as tta
import peers
import pytest
import torch

from vitlab.data.dataset import ImageDataset
from vitlab.model import parse_variant

KEYS = {"name", "top1", "steps", "epochs", "img_per_s", "minutes"}


def fake(n: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.arange(n) % 10, [str(i) for i in range(10)])


def tiny_vit():
    return peers.timm_vit(32, 1, 2, 64)


@pytest.mark.parametrize("build", [tiny_vit, peers.resnet18_32px], ids=["timm-vit", "resnet18"])
def test_each_peer_trains_its_steps_and_scores(build):
    entry = peers.train_peer("peer", build, minutes=60, train=fake(64, 0), test=fake(32, 1), batch_size=16,
                             max_steps=2, probe_steps=1, log=lambda m: None)
    assert KEYS <= set(entry)
    assert entry["steps"] == 2 and entry["epochs"] == pytest.approx(2 / 4)  # 64 images in batches of 16
    assert 0.0 <= entry["top1"] <= 1.0 and entry["top1"] * 32 == round(entry["top1"] * 32)  # k of 32 right
    assert entry["precision"] in peers.PRECISIONS and set(entry["probe_step_s"]) == set(peers.PRECISIONS)
    assert entry["img_per_s"] > 0 and entry["params"] == sum(p.numel() for p in build().parameters())


def test_the_timm_peer_is_timm_with_the_recipe_shape():
    from timm.models.vision_transformer import VisionTransformer

    m = peers.timm_vit(128, 6, 4, 256)
    assert isinstance(m, VisionTransformer) and len(m.blocks) == 6 and m.cls_token is not None
    assert m.patch_embed.proj.kernel_size == (4, 4) and m.blocks[0].mlp.fc1.out_features == 256
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_is_adapted_to_32px():
    m = peers.resnet18_32px()
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)
    feats = torch.nn.Sequential(*list(m.children())[:-2])(torch.zeros(1, 3, 32, 32))
    assert feats.shape[-1] == 4  # 32 px / 8 (three stride-2 stages), not / 32 as at ImageNet's stem


def run_on_a_ticking_clock(after_plan_s: float) -> dict:
    """A peer run for 1 minute on an injected clock that advances 1 s per reading while probing and planning,
    then `after_plan_s` per reading (the machine changed speed after the probe)."""
    now, tick = [0.0], [1.0]

    def clock():
        now[0] += tick[0]
        return now[0]

    def log(msg):
        if "planned" in msg:
            tick[0] = after_plan_s
    return peers.train_peer("peer", tiny_vit, minutes=1, train=fake(64, 0), test=fake(32, 1), batch_size=16,
                            probe_steps=1, clock=clock, started_at=0.0, log=log)


def test_the_clock_stops_a_run_slower_than_planned():
    """5 s a reading once training starts: the loop stops by the clock, before the planned steps, leaving the
    evaluation's time."""
    entry = run_on_a_ticking_clock(5.0)
    eval_s = 1.0 * 32 / 16 / 3  # a probed step of 1 s (two readings 1 s apart), 32 test images in batches of 16
    assert entry["probe_step_s"] == {"fp32": 1.0, "bf16": 1.0} and entry["precision"] == "fp32"  # a tie: fp32
    assert entry["planned_steps"] == int(60 - 5 - eval_s)  # planned at reading 5 (4 probe readings before it)
    # then 5 s a reading: t_train 10; epoch 1: 15, 20, 25, 30 (4 steps), its end 35; the re-plan (25 s for 4
    # steps) leaves room for 3 more: 40, 45, 50; 7 steps of the 54 planned
    assert entry["steps"] == 7 < entry["planned_steps"] and entry["final_planned_steps"] == 7


def test_a_machine_that_speeds_up_is_replanned_to_use_its_minutes():
    """0.5 s a reading once training starts: the probe's plan (54 steps) would end the run at about 37 s of its
    60; the re-plan at each epoch's end stretches the cosine to the clock."""
    entry = run_on_a_ticking_clock(0.5)
    assert entry["planned_steps"] == 54 and entry["steps"] == entry["final_planned_steps"] > 54
    assert 55 <= entry["minutes"] * 60 <= 61  # the clock read twice more after the loop, 0.5 s each


def test_peers_file_has_one_entry_per_run_and_the_lead(tmp_path, tiny_cifar):
    """benchmarks/peers.py in its own process on CIFAR-10 files, then the peers file read back."""
    data = tiny_cifar(tmp_path / "data", train=64, test=32)
    timm_entry = tta.run_peer("timm-vit", minutes=5, model=parse_variant("tutorial"), out=tmp_path / "timm.json",
                              data=str(data), peak=410.5, flags=("--batch-size", "16", "--max-steps", "2",
                                                                  "--probe-steps", "1"))
    assert timm_entry["steps"] == 2 and timm_entry["name"] == "timm ViT 48w 4d" and timm_entry["peer"] == "timm-vit"
    assert timm_entry["reference_minutes"] == pytest.approx(timm_entry["minutes"] * 410.5 / 821, abs=0.006)
    vitlab = {"peer": "vitlab", "name": "vitlab sprint", "top1": 0.75, "steps": 500, "epochs": 2.56, "img_per_s": 700.0,
              "peak_gflops": 410.5, "minutes": 3.0, "reference_minutes": 1.5}
    out = tta.write_peers([vitlab, timm_entry], recipe="sprint", minutes=3, env={"cpu": "test"},
                          stamp="20260101-000000", out_dir=tmp_path)
    assert out.name == "cifar10_peers-sprint-3min-20260101-000000.json"
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["runs"]] == ["vitlab sprint", "timm ViT 48w 4d"]
    for r in saved["runs"]:
        assert KEYS | {"peak_gflops", "reference_minutes"} <= set(r) and 0 <= r["top1"] <= 1
    assert saved["lead_over_timm_vit_points"] == pytest.approx(100 * (0.75 - timm_entry["top1"]), abs=0.005)
    assert saved["lead_over_resnet18_points"] is None
    assert f"{saved['lead_over_timm_vit_points']:+.2f} points" in tta.peers_table(saved["runs"])
