import json

import pytest

from vitlab.cli import main


def test_bench_json_times_default_path_and_timm(capsys):
    pytest.importorskip("timm")
    assert main(["bench", "--model", "seed", "--batch-size", "8", "--steps", "1", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = list(out["images_per_sec"])
    assert names[0].startswith("vitlab (") and {"timm (fp32)", "timm (bf16)"} <= set(names)
    assert out["ratio_vs_timm_best"] > 0 and out["timm_best"] in names


def test_bench_bad_input(capsys):
    assert main(["bench", "--model", "seed", "--steps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
