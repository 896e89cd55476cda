"""`vitlab.modeldir.open_model_dir`, the one opener, on every kind of model dir through the commands that take one:
a CNN teacher run, vitlab CLIP / SigLIP dirs, a Hugging Face ViT dir and a timm file with its config.json (random
weights, checked against transformers / timm themselves and against arithmetic done here); what a kind lacks is a
one-line error (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.modeldir import open_model_dir
from vitlab.rundir import EVAL_NAME, write_preprocessor_config

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def shifted(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vitlab {command}: error:"), err
    return err[0]


def predicted(capsys) -> dict[str, float]:
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    return dict(zip(row["labels"], row["probs"]))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 40 x 50 (W x H) RGB file and its pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from vitlab.distill import TeacherConfig, TeacherNet

    d = tmp_path_factory.mktemp("teacher")
    shifted(TeacherNet(TeacherConfig(widths=(8, 16, 16)))).save_pretrained(d, class_names=NAMES)
    write_preprocessor_config(d, image_size=32, mean=MEAN, std=STD)
    return d


def test_teacher_run_predicts_with_its_own_preprocessing(teacher_run, tmp_path, capsys):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the model's size: no resize
    Image.fromarray(pixels).save(tmp_path / "x.png")
    assert main(["predict", str(teacher_run), str(tmp_path / "x.png"), "--json", "--top-k", "10"]) == 0
    got = predicted(capsys)
    x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    md = open_model_dir(teacher_run)
    assert md.kind == "teacher" and md.labels == NAMES
    with torch.no_grad():
        probs = md.model(x).softmax(-1)[0]
    assert [got[n] for n in NAMES] == pytest.approx(probs.tolist(), abs=1e-5)


def test_teacher_run_evaluates_and_summarises(teacher_run, tmp_path, tiny_cifar, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    data = tiny_cifar(tmp_path / "cifar", test=20)
    assert main(["eval", str(run), "--data", str(data), "--no-progress"]) == 0
    record = json.loads((run / EVAL_NAME).read_text())
    from vitlab.data import load_cifar10, normalize

    test = load_cifar10(data, "test")
    with torch.no_grad():
        logits = open_model_dir(run).model(normalize(test.images, MEAN, STD))
    assert record["top1"] == pytest.approx((logits.argmax(-1) == test.labels).float().mean().item())
    assert record["classes"] == NAMES
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in open_model_dir(run).model.parameters())
    assert "CNN teacher" in out and f"{params:,}" in out and "classes" in out and "unknown" not in out


@pytest.mark.parametrize("argv, words", [
    (["explain", "{run}"], "holds a CNN teacher: vitlab explain draws a transformer's attention"),
    (["export", "{run}", "{tmp}/out", "--to", "onnx"], "vitlab export takes a ViT, Swin Transformer"),
    (["zeroshot", "{run}", "--classes", "a,b", "{tmp}/x.png"], "holds a CNN teacher; vitlab zeroshot takes a CLIP"),
])
def test_what_a_teacher_lacks_is_one_line(teacher_run, tmp_path, capsys, argv, words):
    assert main([a.format(run=teacher_run, tmp=tmp_path) for a in argv]) == 2
    assert words in one_line(capsys, argv[0])


def test_the_demo_refuses_a_teacher_in_one_line(teacher_run):
    from vitlab.demo.explorer import Explorer

    with pytest.raises(VitlabError, match="holds a CNN teacher; vitlab demo takes a ViT, Swin Transformer"):
        Explorer.open(teacher_run)


def test_hugging_face_vit_dir_predicts_as_transformers(photo, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=10, id2label=dict(enumerate(NAMES)),
                                 label2id={n: i for i, n in enumerate(NAMES)})
    hf = shifted(transformers.ViTForImageClassification(cfg))
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN),
                                               image_std=list(STD))
    for obj in (hf, processor):
        obj.save_pretrained(tmp_path / "hf")
    assert main(["predict", str(tmp_path / "hf"), str(photo), "--json", "--top-k", "10"]) == 0
    got = predicted(capsys)
    with torch.no_grad(), Image.open(photo) as im:
        ref = hf(**processor(images=im, return_tensors="pt")).logits.softmax(-1)[0]
    assert [got[n] for n in NAMES] == pytest.approx(ref.tolist(), abs=1e-4)
    md = open_model_dir(tmp_path / "hf")
    assert (md.kind, md.origin, md.class_names) == ("vit", "hf_vit", NAMES)
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in hf.parameters()) and info["width"] == 32
    assert "hf_vit" in info["source"]


def test_timm_file_predicts_with_timms_eval_transform(photo, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    tm = shifted(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **args))
    from safetensors.torch import save_file

    d = tmp_path / "timm"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, d / "model.safetensors")
    pretrained = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                  "mean": list(MEAN), "std": list(STD)}
    (d / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10,
                                               "model_args": args, "pretrained_cfg": pretrained,
                                               "label_names": NAMES}))
    assert main(["predict", str(d / "model.safetensors"), str(photo), "--json", "--top-k", "10"]) == 0
    got = predicted(capsys)
    transform = timm.data.create_transform(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.875,
                                           crop_mode="center", mean=MEAN, std=STD)  # resize 36, centre crop 32
    with torch.no_grad(), Image.open(photo) as im:
        ref = tm(transform(im.convert("RGB"))[None]).softmax(-1)[0]
    assert [got[n] for n in NAMES] == pytest.approx(ref.tolist(), abs=1e-5)
    assert open_model_dir(d).origin == "timm"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from vitlab.clip import CLIPConfig, TextConfig, create_clip
    from vitlab.clip.tokenizer import ByteTokenizer
    from vitlab.model.config import ViTConfig
    from vitlab.preprocess import siglip_preprocess

    tok = ByteTokenizer(context_length=16)
    vision = ViTConfig(image_size=16, patch_size=4, num_classes=0, width=32, depth=1, heads=2, mlp_dim=64,
                       class_token=False, pooling="map")
    text = TextConfig(vocab_size=tok.vocab_size, context_length=16, width=24, depth=1, heads=2, mlp_dim=48,
                      causal=False, pooling="last")
    d = tmp_path_factory.mktemp("siglip")
    create_clip(CLIPConfig(vision=vision, text=text, kind="siglip", embed_dim=32), seed=0).save_pretrained(
        d, tokenizer=tok, preprocess=siglip_preprocess(16))
    return d


def test_clip_dir_summary_and_what_it_lacks(clip_dir, photo, capsys):
    assert main(["info", str(clip_dir)]) == 0
    out = capsys.readouterr().out
    assert "SIGLIP: image and text towers" in out and "vision tower" in out and "text tower" in out
    assert main(["predict", str(clip_dir), str(photo)]) == 2
    assert "holds a SigLIP model without a classifier" in one_line(capsys, "predict")
    assert main(["eval", str(clip_dir)]) == 2
    assert "vitlab zeroshot" in one_line(capsys, "eval")


@pytest.mark.parametrize("argv, words", [
    (["predict", "{tmp}/nowhere", "{tmp}/x.png"], "not found: not a model directory"),
    (["info", "{tmp}/empty"], "no config.json describing the weights"),
    (["export", "{tmp}/bert", "{tmp}/out", "--to", "hf"], "model_type 'bert' is not a model vitlab can open"),
    (["predict", "{tmp}/odd", "{tmp}/x.png"], "model_type 'vitlab_thing' is not a vitlab model"),
])
def test_what_is_not_a_model_dir_is_one_line(tmp_path, capsys, argv, words):
    (tmp_path / "empty").mkdir()
    for name, model_type in (("bert", "bert"), ("odd", "vitlab_thing")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type,
                                                                 "architectures": ["NoSuchModel"]}))
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert words in one_line(capsys, argv[0])
