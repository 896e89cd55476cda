"""Every model option through every consumer: a tiny saved run per value of the option tuples (plus registers,
the distillation token and LayerScale), then explain, predict, eval, export and the convert round trips back,
info, the TensorBoard rollout, the demo's panels and fine-tuning (--init) on it, and one torchrun training with
the last value of every tuple. Each ends in success or a one-line error (exit 2) naming what the target lacks.

The cases come from the tuples themselves, so a new option value without support fails here."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import torchrun
from vitlab.cli import main
from vitlab.model import VisionTransformer, create_model
from vitlab.model.config import ACTIVATIONS, POOLINGS, POS_EMBEDS, STEMS
from vitlab.modeldir import open_model_dir
from vitlab.rundir import EVAL_NAME, METRICS_NAME, RUN_CONFIG, write_preprocessor_config
from vitlab.train.finetune import TRAINING_FIELDS
from vitlab.train.predict import load_image

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
NAMES = [f"c{i}" for i in range(10)]


def perturbed(model):
    """Noise on every parameter: zero biases, LayerNorm's 1/0 or LayerScale's 1e-4 cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One saved run per case, as the trainer leaves it: weights, class names, preprocessor config, metrics."""
    root = tmp_path_factory.mktemp("grid")
    out = {}
    for name, overrides in CASES.items():
        d = root / name
        perturbed(create_model("tutorial", seed=0, **{**TINY, **overrides})).save_pretrained(d, class_names=NAMES)
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


@pytest.mark.parametrize("case", CASES)
def test_explain(case, runs, image, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["explain", str(runs[case]), str(image), "--out", str(tmp_path / "x")]) == 0
    pngs = {p.name for p in (tmp_path / "x").glob("*.png")}
    filters = "stem_kernels.png" if CASES[case].get("stem") == "conv" else "patch_filters.png"
    assert {"attention_rollout.png", "attention_heads.png", filters} <= pngs  # every pooling has its rollout


def two_head_mean(model, x):
    """DeiT's prediction computed apart from `forward`: the mean of the class head and the distillation head."""
    feats = model.forward_features(x)  # (B, prefix + N, D)
    cls_logits = model.head(model.forward_head(feats, pre_logits=True))
    dist_logits = model.head_dist(feats[:, int(model.cfg.class_token)])  # the distillation token follows the class
    assert (cls_logits - dist_logits).abs().max() > 1e-3  # two different heads: the mean is not either one
    return (cls_logits + dist_logits) / 2


@pytest.mark.parametrize("case", CASES)
def test_predict(case, runs, image, capsys):
    assert main(["predict", str(runs[case]), str(image), "--json", "--top-k", "10"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    md = open_model_dir(runs[case])
    with torch.no_grad():
        x = md.preprocess([load_image(image)])  # (1, 3, 16, 16) as predict prepares it
        logits = two_head_mean(md.model, x) if case == "distill-token" else md.model(x)
    expected = dict(zip(NAMES, logits.softmax(-1)[0].tolist()))
    assert sorted(row["labels"]) == NAMES and row["probs"] == sorted(row["probs"], reverse=True)
    assert row["probs"] == pytest.approx([expected[label] for label in row["labels"]], abs=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_eval_writes_what_explain_reads(case, runs, tmp_path, tiny_cifar, capsys):
    import shutil

    import torch.nn.functional as F

    from vitlab.data import load_cifar10

    run = tmp_path / "run"
    shutil.copytree(runs[case], run)
    data = tiny_cifar(tmp_path / "cifar", test=10)
    assert main(["eval", str(run), "--data", str(data), "--no-progress"]) == 0
    from vitlab.inspect import load_run

    loaded = load_run(run)
    assert loaded.confusion is not None and int(loaded.confusion.sum()) == 10
    record = json.loads((run / EVAL_NAME).read_text())
    assert record["step"] == 3
    test = load_cifar10(data, "test")  # eval's own arithmetic, redone: normalise, resize to 16 px, forward
    x = (test.images.float() / 255 - 0.5) / 0.25
    x = F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True)
    with torch.no_grad():
        logits = two_head_mean(loaded.model, x) if case == "distill-token" else loaded.model(x)
    assert record["loss"] == pytest.approx(F.cross_entropy(logits, test.labels).item(), rel=1e-4)
    assert record["top1"] == pytest.approx((logits.argmax(-1) == test.labels).float().mean().item())


@pytest.mark.parametrize("to", ["hf", "timm", "onnx"])
@pytest.mark.parametrize("case", CASES)
def test_export_and_back_or_names_the_option(case, to, runs, tmp_path, capsys):
    """Export; then the exported model, opened as every command opens a model dir and converted back with `vitlab
    convert`, computes what ours does (the mean of both heads for DeiT). Or one line naming the option."""
    if to == "onnx":
        pytest.importorskip("onnxscript")
    out = tmp_path / to
    rc = main(["export", str(runs[case]), str(out), "--to", to])
    err = capsys.readouterr().err.strip().splitlines()
    if rc != 0:
        assert rc == 2 and len(err) == 1 and err[0].startswith("vitlab export: error:"), err
        assert any(f"{field}=" in err[0] for field in CASES[case]), err  # it names the option
        assert not out.exists()
        return
    ours = VisionTransformer.from_pretrained(runs[case])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = two_head_mean(ours, x) if case == "distill-token" else ours(x)
        if to == "onnx":
            ort = pytest.importorskip("onnxruntime")
            session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
            close(torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0]), expected)
            return
        opened = open_model_dir(out)  # the Hugging Face / timm dir as predict, eval, explain, --init read it
        assert opened.origin == {"hf": "hf_vit", "timm": "timm"}[to] and opened.class_names == NAMES
        assert main(["convert", "--from", to, str(out), str(tmp_path / "back")]) == 0
        back = open_model_dir(tmp_path / "back")
        assert back.origin == "vitlab" and back.class_names == NAMES
        for md in (opened, back):
            close(md.model(x), expected)


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory, tiny_cifar):
    return tiny_cifar(tmp_path_factory.mktemp("ft") / "cifar", train=16, test=8)


@pytest.mark.parametrize("case", CASES)
def test_init_fine_tunes_from_the_run(case, runs, finetune_data, tmp_path):
    """`vitlab train --recipe finetune --init RUN` (32 px CIFAR from a 16 px model): one step, the source's
    architecture, learned positions resampled."""
    out = tmp_path / "ft"
    assert main(["train", "--recipe", "finetune", "--init", str(runs[case]), "--data", str(finetune_data),
                 "--max-steps", "1", "--epochs", "1", "--batch-size", "8", "--eval-batch-size", "8",
                 "--precision", "fp32", "--no-progress", "--out", str(out)]) == 0
    init = json.loads((out / RUN_CONFIG).read_text())["init"]
    src, tuned = VisionTransformer.from_pretrained(runs[case]), VisionTransformer.from_pretrained(out)
    assert init["kind"] == "vitlab" and init["source"] == str(runs[case].resolve()) and init["head"] == "kept"
    assert ("pos_embed" in init["resampled"]) == (src.cfg.pos_embed == "learned")

    def architecture(cfg):
        return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in (*TRAINING_FIELDS, "image_size", "name")}

    assert tuned.cfg.image_size == 32 and architecture(tuned.cfg) == architecture(src.cfg)
    moved = [k for k, v in src.state_dict().items() if k != "pos_embed" and not torch.equal(tuned.state_dict()[k], v)]
    assert moved, "one step of fine-tuning changed nothing"


@pytest.mark.parametrize("case", CASES)
def test_info(case, runs, capsys):
    assert main(["info", str(runs[case]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case", CASES)
def test_tensorboard_rollout_image(case, runs):
    pytest.importorskip("matplotlib")
    from vitlab.train.tensorboard import RolloutProbe

    probe = RolloutProbe(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1]), NAMES,
                         mean=(0.5,) * 3, std=(0.25,) * 3)
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


# The last value of every option tuple (a new value is appended, so it lands here), registers and LayerScale.
LAST = {"stem": STEMS[-1], "pooling": POOLINGS[-1], "class_token": POOLINGS[-1] == "cls", "pos_embed": POS_EMBEDS[-1],
        "activation": ACTIVATIONS[-1], "reg_tokens": 1, "layerscale_init": 1e-4}


def test_torchrun_trains_the_last_value_of_every_tuple(tmp_path, tiny_cifar, image, capsys):
    data = tiny_cifar(tmp_path / "cifar", train=32, test=8)
    model_args = [a for k, v in LAST.items() for a in ("--model-arg", f"{k}={str(v).lower()}")]
    done = torchrun(tmp_path, "train", "--recipe", "tutorial", "--model", "test", *model_args, "--data", str(data),
                    "--epochs", "1", "--batch-size", "8", "--eval-batch-size", "8", "--precision", "fp32",
                    "--no-progress", "--out", "run")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    record = json.loads((run / RUN_CONFIG).read_text())
    assert record["launch"]["world_size"] == 2 and record["plan"]["global_batch_size"] == 16
    cfg = VisionTransformer.from_pretrained(run).cfg
    assert {k: getattr(cfg, k) for k in LAST} == LAST
    assert main(["predict", str(run), str(image), "--json"]) == 0  # and the run it wrote is usable
    assert len(json.loads(capsys.readouterr().out)["labels"]) == 5
