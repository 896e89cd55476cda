"""Every model option through every consumer: a tiny saved run per value of the option tuples (plus registers,
the distillation token and LayerScale), then explain, predict, eval, export, info, the TensorBoard rollout and
the demo's panels on it. Each ends in success or a one-line error (exit 2) naming what the target lacks.

The cases come from the tuples themselves, so a new option value without support fails here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.model import create_model
from vitlab.model.config import ACTIVATIONS, POOLINGS, POS_EMBEDS, STEMS
from vitlab.rundir import EVAL_NAME, METRICS_NAME, write_preprocessor_config

TINY = dict(width=16, depth=2, heads=2, mlp_dim=32, image_size=16, patch_size=4, num_classes=10)
CASES = {
    **{f"pooling-{p}": dict(pooling=p, class_token=p == "cls") for p in POOLINGS},
    **{f"pos-{p}": dict(pos_embed=p) for p in POS_EMBEDS},
    **{f"stem-{s}": dict(stem=s) for s in STEMS},
    **{f"act-{a}": dict(activation=a) for a in ACTIVATIONS},
    "registers": dict(reg_tokens=2),
    "distill-token": dict(distill_token=True),
    "layerscale": dict(layerscale_init=1e-4),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One saved run per case, as the trainer leaves it: weights, class names, preprocessor config, metrics."""
    root = tmp_path_factory.mktemp("grid")
    out = {}
    for name, overrides in CASES.items():
        d = root / name
        create_model("tutorial", seed=0, **{**TINY, **overrides}).save_pretrained(d, class_names=[f"c{i}" for i in
                                                                                                  range(10)])
        write_preprocessor_config(d, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
        (d / METRICS_NAME).write_text(json.dumps({"epoch": 1, "step": 3, "train_loss": 2.3, "test_top1": 0.1}) + "\n")
        out[name] = d
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "c3" / "x.png"
    p.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(p)
    return p


def one_line_or_ok(rc, capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line or "Traceback" in line]
    assert rc == 0 or (rc == 2 and len(errors) == 1 and "Traceback" not in errors[0]), err
    return rc


@pytest.mark.parametrize("case", CASES)
def test_explain(case, runs, image, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["explain", str(runs[case]), str(image), "--out", str(tmp_path / "x")]) == 0
    pngs = {p.name for p in (tmp_path / "x").glob("*.png")}
    filters = "stem_kernels.png" if CASES[case].get("stem") == "conv" else "patch_filters.png"
    assert {"attention_rollout.png", "attention_heads.png", filters} <= pngs  # every pooling has its rollout


@pytest.mark.parametrize("case", CASES)
def test_predict_and_the_distilled_mean(case, runs, image, capsys):
    assert main(["predict", str(runs[case]), str(image), "--json", "--top-k", "10"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(row["labels"]) == 10 and sum(row["probs"]) == pytest.approx(1, abs=1e-4)
    from vitlab.model import VisionTransformer

    model = VisionTransformer.from_pretrained(runs[case]).eval()
    if model.head_dist is not None:  # DeiT: the mean of the class and distillation heads
        x = torch.randn(2, 3, 16, 16)
        feats = model.forward_features(x)
        p = model.cfg.class_token
        expected = (model.head(model.pool(feats)) + model.head_dist(feats[:, int(p)])) / 2
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("case", CASES)
def test_eval_writes_what_explain_reads(case, runs, tmp_path, tiny_cifar, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs[case], run)
    assert main(["eval", str(run), "--data", str(tiny_cifar(tmp_path / "cifar", test=10)), "--no-progress"]) == 0
    from vitlab.inspect import load_run

    loaded = load_run(run)
    assert loaded.confusion is not None and int(loaded.confusion.sum()) == 10
    assert json.loads((run / EVAL_NAME).read_text())["step"] == 3


@pytest.mark.parametrize("to", ["hf", "timm", "onnx"])
@pytest.mark.parametrize("case", CASES)
def test_export_succeeds_or_names_the_option(case, to, runs, tmp_path, capsys):
    if to == "onnx":
        pytest.importorskip("onnxscript")
    rc = one_line_or_ok(main(["export", str(runs[case]), str(tmp_path / to), "--to", to]), capsys)
    if rc == 2:
        assert not (tmp_path / to).exists()


@pytest.mark.parametrize("case", CASES)
def test_info(case, runs, capsys):
    assert main(["info", str(runs[case]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case", CASES)
def test_tensorboard_rollout_image(case, runs):
    pytest.importorskip("matplotlib")
    from vitlab.model import VisionTransformer
    from vitlab.train.tensorboard import RolloutProbe

    probe = RolloutProbe(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1]),
                         [f"c{i}" for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3)
    img = probe.image(VisionTransformer.from_pretrained(runs[case]), step=1)
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0


@pytest.mark.parametrize("case", CASES)
def test_demo_panels(case, runs, image):
    from vitlab.demo.explorer import Explorer

    ex = Explorer.open(runs[case])
    view = ex.analyse(image)
    assert view.rollout is not None and view.rollout.shape == (4, 4)  # every pooling has a rollout now
    assert sum(ex.top_classes(view, k=3).values()) <= 1 + 1e-6
    ex.overlay_image(view, view.rollout)
    ex.patch_grid_image(view, patch=0)
    ex.attention_row(view, 0, None, "cls" if ex.cfg.class_token else "patches", None)
    if ex.cfg.pos_embed != "none":
        assert ex.position_similarity() is not None
