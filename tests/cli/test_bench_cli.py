"""`vitlab bench`: the JSON's numbers are the timed blocks' rates, and the headline ratio is built from them."""

import json
import statistics
import types

import pytest
import torch

from vitlab import bench
from vitlab.cli import main

ARGV = ["bench", "--model", "tutorial", "--batch-size", "8", "--steps", "2", "--repeats", "3"]


def test_bench_json_is_consistent(capsys):
    pytest.importorskip("timm")
    assert main([*ARGV, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tutorial" and out["batch_size"] == 8 and out["threads"] == torch.get_num_threads()
    names = list(out["images_per_sec"])
    assert names[0].startswith("vitlab (") and names[1:] == ["timm (fp32)", "timm (bf16)"]
    for t in out["images_per_sec"].values():
        assert len(t["all"]) == 3 and all(r > 0 for r in t["all"])
        assert t["median"] == statistics.median(t["all"]) and t["best"] == max(t["all"])
    timm_medians = {k: out["images_per_sec"][k]["median"] for k in names[1:]}
    assert out["timm_best"] == max(timm_medians, key=timm_medians.get)
    assert out["ratio_vs_timm_best"] == pytest.approx(
        out["images_per_sec"][names[0]]["median"] / timm_medians[out["timm_best"]], rel=1e-12)


def test_bench_numbers_from_an_injected_clock(monkeypatch, capsys):
    """Each timed block lasts a chosen time: rates, medians, the best timm mode and the ratio are then exact."""
    pytest.importorskip("timm")
    # seconds per block, in the order bench times them: repeat by repeat, vitlab, timm fp32, timm bf16
    seconds = [0.1, 0.5, 0.2, 0.1, 0.1, 0.2, 0.4, 1.0, 0.8]
    reads, now = [0], [0.0]

    def perf_counter():  # blocks read the clock twice (start, end); the end read advances it
        reads[0] += 1
        if reads[0] % 2 == 0:
            now[0] += seconds[reads[0] // 2 - 1]
        return now[0]

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=perf_counter))
    assert main([*ARGV, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert reads[0] == 2 * len(seconds)
    rates = {name: t["all"] for name, t in out["images_per_sec"].items()}
    vit, fp32, bf16 = rates.values()
    imgs = 8 * 2  # batch x steps per block
    assert vit == pytest.approx([imgs / 0.1, imgs / 0.1, imgs / 0.4])
    assert fp32 == pytest.approx([imgs / 0.5, imgs / 0.1, imgs / 1.0])
    assert bf16 == pytest.approx([imgs / 0.2, imgs / 0.2, imgs / 0.8])
    assert out["timm_best"] == "timm (bf16)"  # by median (80 vs 32 img/s), though fp32's best block is faster
    assert out["ratio_vs_timm_best"] == pytest.approx(2.0)  # vitlab's median 160 over bf16's 80
    assert out["images_per_sec"]["timm (fp32)"]["best"] == pytest.approx(imgs / 0.1)

    seconds[3] = 0.2  # vitlab's second block half as fast: its median drops to 80 img/s, timm's best
    reads[0] = 0
    assert main(ARGV) == 0  # the human-readable form
    text = capsys.readouterr().out
    assert f"{imgs / 0.2:8.1f} img/s   (best {imgs / 0.1:.1f})" in text and "vitlab / timm (bf16): 1.00x" in text


def test_bench_bad_input(capsys):
    assert main(["bench", "--model", "tutorial", "--steps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_matmul_peak_is_2n3_flops_over_the_median_loop():
    """An injected clock makes each timed loop last a chosen time: the peak is then 2 n^3 x iters / median."""
    seconds = iter([0.5, 0.1, 0.3, 2.0, 0.2])  # median 0.3 s: neither the first, the fastest nor the mean
    now = [0.0]

    def clock():  # start and end of each loop: the end read advances the clock by that loop's seconds
        clock.reads += 1
        if clock.reads % 2 == 0:
            now[0] += next(seconds)
        return now[0]
    clock.reads = 0
    gflops = bench.matmul_peak(torch.float32, 16, repeats=5, iters=3, clock=clock)
    assert clock.reads == 10
    assert gflops == pytest.approx(2 * 16**3 * 3 / 0.3 / 1e9, rel=1e-12)


def test_reference_minutes_scale_by_the_peak():
    assert bench.reference_minutes(3.0, 385.0) == pytest.approx(3.0 * 385 / 821)
    assert bench.reference_minutes(10.0, 1642.0, ref=821.0) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        bench.reference_minutes(1.0, 0.0)
    # the inverse: the wall budget for 3 reference minutes on the 385 GFLOP/s machine, and back
    assert bench.wall_minutes_for(3.0, 385.0) == pytest.approx(3.0 * 821 / 385)
    assert bench.reference_minutes(bench.wall_minutes_for(3.0, 385.0), 385.0) == pytest.approx(3.0)


def test_bench_peak_json_from_an_injected_clock(monkeypatch, capsys):
    """`vitlab bench --peak`: fp32 first, then bf16, each the median of its --repeats loops."""
    seconds = [0.4, 0.2, 0.8, 0.1, 0.3, 0.05]  # fp32 loops, then bf16 loops
    reads, now = [0], [0.0]

    def perf_counter():
        reads[0] += 1
        if reads[0] % 2 == 0:
            now[0] += seconds[reads[0] // 2 - 1]
        return now[0]

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=perf_counter))
    assert main(["bench", "--peak", "--peak-size", "32", "--repeats", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    flops = 2 * 32**3 * 2  # 2 n^3 per product, 2 products per loop
    assert out["fp32_gflops"] == pytest.approx(flops / 0.4 / 1e9)
    assert out["bf16_gflops"] == pytest.approx(flops / 0.1 / 1e9)
    assert out["reference_minutes_per_minute"] == pytest.approx(out["bf16_gflops"] / 821.0)
    assert out["sizes"] == {"fp32": 32, "bf16": 32} and out["repeats"] == 3
    reads[0], now[0] = 0, 0.0
    assert main(["bench", "--peak", "--peak-size", "32", "--repeats", "3"]) == 0
    assert f"bf16  {flops / 0.1 / 1e9:8.1f} GFLOP/s" in capsys.readouterr().out


def test_bench_peak_bad_size(capsys):
    assert main(["bench", "--peak", "--peak-size", "0"]) == 2
    assert "--peak-size must be positive" in capsys.readouterr().err
