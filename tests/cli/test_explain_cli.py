"""`vitlab explain` end to end on tiny saved runs: every pooling, registers, image files and CIFAR test images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import check_report, write_images
from vitlab.cli import main
from vitlab.model import create_model

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = dict(width=16, depth=2, heads=2, mlp_dim=32, image_size=16, patch_size=4, num_classes=10)
ALWAYS = {"position_similarity.png", "patch_filters.png", "training_curves.png"}
WITH_IMAGES = {"attention_heads.png", "attention_layers.png", "attention_rollout.png", "attention_distance.png",
               "embeddings.png"}


@pytest.fixture
def matplotlib():
    """The drawing tests need the plot extra; only they skip without it."""
    return pytest.importorskip("matplotlib")


def make_run(path, **overrides):
    model = create_model("tutorial", seed=0, **{**TINY, **overrides})
    model.save_pretrained(path, class_names=CLASSES)
    with open(path / "metrics.jsonl", "w") as f:
        for e in range(1, 4):
            f.write(json.dumps({"epoch": e, "train_loss": 2.3 / e, "test_loss": 2.4 / e, "test_top1": 0.1 * e,
                                "test_top5": 0.3 + 0.1 * e, "lr": 1e-3}) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.49, 0.48, 0.45], "image_std": [0.25, 0.24, 0.26], "rescale_factor": 1 / 255,
         "size": {"height": 16, "width": 16}}))
    return path


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(pooling="gap", class_token=False),
    dict(pooling="map", class_token=False, pos_embed="sincos2d"),
    dict(reg_tokens=2, pos_embed_prefix=False),
    dict(pooling="seq", class_token=False),
    dict(stem="conv"),
    dict(distill_token=True, layerscale_init=1e-4),
], ids=["cls", "gap", "map-sincos", "cls-registers", "seq", "conv-stem", "distill-layerscale"])
def test_explain_image_files(matplotlib, tmp_path, capsys, overrides):
    run = make_run(tmp_path / "run", **overrides)
    images = write_images(tmp_path / "cat", 3)  # a folder named like a class: the true label is known
    out = tmp_path / "out"
    assert main(["explain", str(run), *images, "--out", str(out), "--show", "2"]) == 0
    filters = {"stem_kernels.png"} if overrides.get("stem") == "conv" else {"patch_filters.png"}
    page = check_report(out, (ALWAYS - {"patch_filters.png"}) | filters | WITH_IMAGES | {"confusion_matrix.png"})
    assert "accuracy on these images" in page
    pooling = overrides.get("pooling", "cls")
    assert {"cls": "class token", "gap": "averaged patch tokens", "map": "MAP head",
            "seq": "sequence-pooling weights"}[pooling] in page
    if overrides.get("reg_tokens"):
        assert "2 register tokens are left out" in page
    assert "wrote 9 figures" in capsys.readouterr().out


def test_explain_timm_conversion(matplotlib, tmp_path):
    """A timm model (registers, positions without the prefix, MAP head) converted and saved explains too."""
    timm = pytest.importorskip("timm")
    from vitlab.convert import from_timm

    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10,
        reg_tokens=2, no_embed_class=True, global_pool="map", class_token=False)
    from_timm(ref).save_pretrained(tmp_path / "run", class_names=CLASSES)
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "run"), *write_images(tmp_path / "dog", 3), "--out", str(out)]) == 0
    check_report(out, (ALWAYS - {"training_curves.png"}) | WITH_IMAGES | {"confusion_matrix.png"})


def test_explain_clip_image_tower(matplotlib, tmp_path, capsys, tiny_cifar):
    """A saved SigLIP model: its image tower (MAP pooling, no classifier) is explained."""
    from vitlab.clip import CLIPConfig, TextConfig, create_clip
    from vitlab.clip.tokenizer import ByteTokenizer
    from vitlab.model import parse_variant
    from vitlab.preprocess import siglip_preprocess

    vision = parse_variant("tutorial", **{**TINY, "num_classes": 0}, pooling="map", class_token=False)
    text = TextConfig(context_length=8, width=16, depth=1, heads=2, mlp_dim=32, causal=False, pooling="last")
    model = create_clip(CLIPConfig(vision=vision, text=text, kind="siglip", embed_dim=16), seed=0)
    model.save_pretrained(tmp_path / "siglip", tokenizer=ByteTokenizer(context_length=8),
                          preprocess=siglip_preprocess(16))
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "siglip"), *write_images(tmp_path / "x", 3), "--out", str(out)]) == 0
    page = check_report(out, {"position_similarity.png", "patch_filters.png"}
                        | (WITH_IMAGES - {"embeddings.png"}))
    assert "image tower of a SIGLIP model" in page and "MAP head" in page
    # CIFAR test images bring their labels: the embedding map is coloured by CIFAR's classes
    data = tiny_cifar(tmp_path / "cifar", test=12)
    assert main(["explain", str(tmp_path / "siglip"), "--test-images", "12", "--data", str(data), "--out",
                 str(tmp_path / "out2")]) == 0
    check_report(tmp_path / "out2", {"position_similarity.png", "patch_filters.png"} | WITH_IMAGES)


def test_explain_without_position_embedding_uses_eval_json(matplotlib, tmp_path, capsys, tiny_cifar):
    """The confusion matrix comes from the eval.json that `vitlab eval` itself wrote (writer and reader meet)."""
    run = make_run(tmp_path / "run", pos_embed="none")
    assert main(["eval", str(run), "--data", str(tiny_cifar(tmp_path / "cifar", test=20))]) == 0
    written = json.loads((run / "eval.json").read_text())
    images = write_images(tmp_path / "unlabelled", 2)
    out = tmp_path / "out"
    assert main(["explain", str(run), *images, "--out", str(out)]) == 0
    page = check_report(out, (ALWAYS - {"position_similarity.png"}) | (WITH_IMAGES - {"embeddings.png"})
                        | {"confusion_matrix.png"})
    assert "no position embedding" in page and "embedding map skipped" in page
    assert "from eval.json" in page  # the images are unlabelled: eval.json is the only source of counts
    assert np.sum(written["confusion"]) == 20 and written["top1"] == pytest.approx(np.trace(written["confusion"]) / 20)
    assert "note: " in capsys.readouterr().out


def test_explain_test_images(matplotlib, tmp_path, tiny_cifar):
    data = tiny_cifar(tmp_path / "cifar", test=24)
    run = make_run(tmp_path / "run", pooling="gap", reg_tokens=1)
    assert main(["explain", str(run), "--test-images", "20", "--data", str(data), "--batch-size", "8",
                 "--show", "3"]) == 0
    out = run / "explain"  # the default output folder
    page = check_report(out, ALWAYS | WITH_IMAGES | {"confusion_matrix.png"})
    assert "first 20 CIFAR-10 test images" in page
    with Image.open(out / "attention_heads.png") as im:
        assert im.size[1] > 3 * 150  # three image rows drawn


def test_explain_real_cifar(matplotlib, tmp_path, cifar_dir):
    run = make_run(tmp_path / "run", image_size=32)
    assert main(["explain", str(run), "--test-images", "16", "--data", str(cifar_dir), "--out",
                 str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "embeddings.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["{tmp}/missing_run"], "not found"),
    (["{run}", "{tmp}/bad.png"], "cannot read image"),
    (["{run}", "{tmp}/nope.png"], "not found"),
    (["{run}", "{tmp}/bad.png", "--test-images", "3"], "not both"),
    (["{run}", "--test-images", "0"], "at least 1"),
    (["{tmp}"], "no config.json"),
])
def test_bad_input_is_one_line_exit_2(matplotlib, tmp_path, capsys, args, words):
    run = make_run(tmp_path / "run")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    argv = ["explain"] + [a.format(tmp=tmp_path, run=run) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitlab explain: error:") and words in err


def test_without_matplotlib_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    assert main(["explain", str(make_run(tmp_path / "run")), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'vitlab[plot]'" in err
    assert not (tmp_path / "out").exists()


def test_notebook_api_matches_cli_numbers(tmp_path):
    """The CLI's attention distance equals the library function on the same images (no hidden math)."""
    from vitlab.inspect import attention_maps, load_run, mean_attention_distance, model_inputs
    from vitlab.inspect.explain import Inputs, analyse

    run = load_run(make_run(tmp_path / "run"))
    images = (torch.rand(5, 3, 16, 16) * 255).to(torch.uint8)
    an = analyse(run, Inputs(images, torch.full((5,), -1), "random"), show=2, batch_size=2)
    attns = attention_maps(run.model, model_inputs(run.preprocess, images))
    expected = mean_attention_distance(attns, grid=4, patch_size=4, num_prefix_tokens=1)
    torch.testing.assert_close(an.distance, expected)
    assert an.attns[0].shape == (2, 2, 17, 17)


def test_weight_only_report(matplotlib, tmp_path):
    """Without images, explain_run still draws the weight views and the run's metrics."""
    from vitlab.inspect import load_run
    from vitlab.inspect.explain import explain_run
    from vitlab.rundir import write_eval

    run = make_run(tmp_path / "run")
    write_eval(run / "eval.json", {"top1": 0.1}, torch.eye(10, dtype=torch.int64))  # the writer `vitlab eval` uses
    result = explain_run(load_run(run), None, out_dir=tmp_path / "out")
    check_report(tmp_path / "out", ALWAYS | {"confusion_matrix.png"})
    assert result.report == tmp_path / "out" / "report.html"
