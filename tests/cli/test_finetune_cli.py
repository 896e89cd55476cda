"""`vitlab train --init SRC` end to end through the CLI, from a timm hub dir and a Hugging Face ViT dir (random
weights, converted by vitlab on the way in): the run records where its weights came from, a linear probe
(--freeze-backbone) leaves the converted backbone exactly as converted, --layer-decay scales each layer's
learning rate; bad fine-tuning options are one-line errors."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from vitlab.cli import main
from vitlab.train.finetune import init_from
from vitlab.weights import load_state_dict

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

# timm's ViT at 64 px with 8 px patches (an 8x8 grid); CIFAR is 32 px, so positions are resampled to 4x4
TIMM_ARGS = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0)
HF_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
RUN = ["--epochs", "1", "--batch-size", "16", "--precision", "fp32", "--no-progress", "--eval-batch-size", "32"]


def perturbed(module):
    """Noise on every parameter: zero biases or LayerNorm's 1/0 init cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_cifar):
    return tiny_cifar(tmp_path_factory.mktemp("data") / "cifar", train=64, test=32)


def test_linear_probe_of_a_timm_dir(tmp_path, data):
    tm = perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TIMM_ARGS))
    src = tmp_path / "timm"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 5,
                                                 "model_args": TIMM_ARGS}))
    out = tmp_path / "probe"
    assert main(["train", "--recipe", "finetune", "--init", str(src), "--freeze-backbone", "--data", str(data),
                 *RUN, "--out", str(out)]) == 0
    init = json.loads((out / "train_config.json").read_text())["init"]
    assert init["kind"] == "timm" and init["source"] == str(src.resolve()) and init["head"] == "replaced"
    assert init["files"] == {"model.safetensors": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()}
    assert init["resampled"] == {"pos_embed": {"from": [8, 8], "to": [4, 4]}} and init["source_num_classes"] == 5
    assert init["trainable"] == ["head.weight", "head.bias"]
    converted, _ = init_from(src, image_size=32, num_classes=10)  # what vitlab makes of the timm weights
    trained = load_state_dict(out / "model.safetensors")
    for k, v in converted.state_dict().items():
        if k.startswith("head."):
            assert trained[k].abs().sum() > 0, k  # the zero-initialised classifier learned
        else:
            assert torch.equal(trained[k], v), k  # the backbone stayed what was converted


def test_fine_tuning_a_hugging_face_dir_with_layer_decay(tmp_path, data):
    hf = perturbed(transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY, num_labels=4)))
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "tuned"
    assert main(["train", "--recipe", "finetune", "--init", str(tmp_path / "hf"), "--layer-decay", "0.5",
                 "--data", str(data), *RUN, "--out", str(out)]) == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["init"]["kind"] == "hf_vit" and record["init"]["head"] == "replaced"
    assert record["config"]["layer_decay"] == 0.5 and record["model"]["config"]["width"] == 32
    state = json.loads(next((out / "checkpoint").glob("step-*/state.json")).read_text())
    lr = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    scales = sorted({g["lr_scale"] for g in state["optimizer"]["param_groups"]})
    assert scales == [0.5**3, 0.5**2, 0.5, 1.0]  # embeddings, block 0, block 1 and the final norm, head (as timm)
    for g in state["optimizer"]["param_groups"]:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])
    before, _ = init_from(tmp_path / "hf", image_size=32, num_classes=10)
    after = load_state_dict(out / "model.safetensors")
    assert all(not torch.equal(after[k], v) for k, v in before.state_dict().items() if k != "pos_embed"), \
        "every layer trains, the lowest the slowest"


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "finetune"], "--recipe finetune fine-tunes pretrained weights: give them with --init SRC"),
    (["--freeze-backbone"], "freeze_backbone and variant describe the init weights"),
    (["--init", "nowhere/model.safetensors"], "not found"),
    (["--layer-decay", "1.5"], "layer_decay must be in [0, 1]"),
])
def test_bad_fine_tuning_options_are_one_line(tmp_path, data, capsys, argv, message):
    assert main(["train", *argv, "--data", str(data), *RUN, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
