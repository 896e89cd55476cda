"""`vitlab zeroshot` and `vitlab train-clip` end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.clip.tokenizer import ByteTokenizer
from vitlab.clip.zeroshot import zero_shot_classifier, zero_shot_predict
from vitlab.modeldir import open_model_dir
from vitlab.preprocess import siglip_preprocess


def _images(tmp_path, n=2, size=(40, 30)):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_zeroshot_cli_on_a_vitlab_dir(tmp_path, capsys):
    from test_clip_model import TOK, tiny

    tiny("siglip").save_pretrained(tmp_path / "m", tokenizer=TOK, preprocess=siglip_preprocess(16))
    templates = tmp_path / "templates.txt"
    templates.write_text("# prompts\na photo of a {}.\n\na sketch of a {}.\n")
    paths = _images(tmp_path)
    rc = main(["zeroshot", str(tmp_path / "m"), "--classes", "cat, dog,ship", "--templates", str(templates),
               "--top-k", "2", *paths])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].startswith("siglip model, 3 classes, 2 template(s)")
    assert out[1] == paths[0] and out[4] == paths[1]
    rows = [line.split() for line in out[2:4]]
    assert {r[1] for r in rows} <= {"cat", "dog", "ship"} and float(rows[0][0]) >= float(rows[1][0])


def test_zeroshot_cli_errors(tmp_path, capsys):
    assert main(["zeroshot", str(tmp_path / "nope"), "--classes", "a,b", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model directory" in err[0]
    assert main(["zeroshot", str(tmp_path), "--classes", "a", "x.png"]) == 2
    assert "at least two" in capsys.readouterr().err


def test_zeroshot_on_a_hugging_face_dir_matches_transformers(tmp_path, capsys):
    """A transformers CLIP directory (weights, tokenizer.json, preprocessor_config.json) gives HF's probabilities."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[PAD]", "[UNK]", "a", "photo", "of", "cat", "dog", "ship", "<eos>"]
    wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    wl.post_processor = tokenizers.processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 8)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="[PAD]", eos_token="<eos>",
                                               unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(words), max_position_embeddings=16, eos_token_id=8, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16)
    hf = transformers.CLIPModel(cfg).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for obj in (hf, tok, processor):
        obj.save_pretrained(tmp_path / "hf")
    paths = _images(tmp_path, n=3, size=(50, 37))
    classes = ["cat", "dog", "ship"]

    md = open_model_dir(tmp_path / "hf")
    model, tokenizer, preprocess = md.model, md.tokenizer, md.preprocess
    ours = zero_shot_predict(model, zero_shot_classifier(model, tokenizer, classes, ["a photo of a {}"]),
                             preprocess(paths))
    with torch.no_grad():
        ids = tok([f"a photo of a {c}" for c in classes], padding="max_length", max_length=16,
                  return_tensors="pt").input_ids
        pixels = processor(images=[Image.open(p) for p in paths], return_tensors="pt").pixel_values
        ref = hf(input_ids=ids, pixel_values=pixels).logits_per_image.softmax(dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert main(["zeroshot", str(tmp_path / "hf"), "--classes", ",".join(classes), *paths]) == 0
    assert capsys.readouterr().out.startswith("clip model, 3 classes")


def test_train_clip_few_steps_writes_a_usable_dir(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train-clip", "--loss", "clip", "--batch-size", "32", "--max-steps", "3", "--time-budget", "120",
               "--data", str(cifar_dir), "--train-subset", "500", "--test-subset", "100", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "3 steps, 96 images" in printed and "zero-shot accuracy on 100 CIFAR-10 test images" in printed
    # the shared loop's run dir: metrics per evaluation, the loss curve, a resumable checkpoint
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 3 and 0 <= rows[0]["test_top1"] <= rows[0]["test_top5"] <= 1
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 3
    record = json.loads((out / "train_config.json").read_text())
    assert record["task"] == "clip" and record["config"]["loss"] == "clip" and record["plan"]["total_steps"] == 3
    assert (out / "checkpoint" / "latest.json").is_file()
    md = open_model_dir(out)
    model, tokenizer, preprocess = md.model, md.tokenizer, md.preprocess
    assert model.kind == "clip" and isinstance(tokenizer, ByteTokenizer) and preprocess.output_size == 32
    from vitlab.data import load_cifar10

    test = load_cifar10(cifar_dir, "test")
    img = tmp_path / "test0.png"
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).save(img)
    assert main(["zeroshot", str(out), "--classes", ",".join(test.classes), "--top-k", "3", str(img)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    # the zero-shot accuracy printed is the one `vitlab zeroshot`'s model gives on those 100 images
    from vitlab.clip.zeroshot import TEMPLATES, zero_shot_accuracy

    classifier = zero_shot_classifier(model, tokenizer, test.classes, TEMPLATES)
    acc = zero_shot_accuracy(model, classifier, test.images[:100], test.labels[:100],
                             transform=lambda b: preprocess.normalize(b.permute(0, 2, 3, 1).numpy()))
    assert acc == pytest.approx(rows[0]["test_top1"])


def test_interrupted_train_clip_resumes_to_the_same_weights(cifar_dir, tmp_path, monkeypatch, capsys):
    """Killed a few steps into epoch 2, `train-clip --resume` ends with the uninterrupted run's weights."""
    from vitlab.train.loop import Trainer
    from vitlab.weights import load_state_dict

    args = ["train-clip", "--batch-size", "32", "--time-budget", "0", "--epochs", "3", "--ema", "0.9",
            "--width", "32", "--depth", "1", "--text-width", "32", "--text-depth", "1", "--data", str(cifar_dir),
            "--train-subset", "128", "--test-subset", "50", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    real_step = Trainer.train_step

    def step(self, batch):
        if self.step == self.steps_per_epoch + 2:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert main(["train-clip", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    capsys.readouterr()
    for name in ("model", "ema"):
        a, b = (load_state_dict(next((tmp_path / run / "checkpoint").glob("step-*")) / f"{name}.safetensors")
                for run in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (load_state_dict(tmp_path / run / "model.safetensors") for run in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, cut = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                 for run in ("full", "cut"))
    assert [r["epoch"] for r in cut] == [1, 2, 3] and [r["test_loss"] for r in cut] == [r["test_loss"] for r in full]
    # the other command's --resume is refused in one line
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 2
    assert "resume it with the command that started it" in capsys.readouterr().err


def test_train_clip_bad_options_are_one_line(tmp_path, capsys):
    assert main(["train-clip", "--batch-size", "1", "--out", str(tmp_path / "x")]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["train-clip", "--resume", str(tmp_path / "r"), "--lr", "1e-3"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train-clip", "--precision", "bf16-pure", "--out", str(tmp_path / "y")]) == 2
    assert "fp32, bf16 or auto" in capsys.readouterr().err
