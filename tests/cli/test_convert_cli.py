"""`vitlab convert` end to end: real timm / transformers checkpoints on disk -> a vitlab directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vitlab.cli import main
from vitlab.model import VisionTransformer


def _noisy(m: torch.nn.Module) -> torch.nn.Module:
    """Shift every parameter off its init, so swapped or skipped weights show in the outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _check_same(out_dir, ref: torch.nn.Module, image_size: int = 32, pick=lambda o: o) -> VisionTransformer:
    ours = VisionTransformer.from_pretrained(out_dir)
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pick(ref(x)), atol=1e-5, rtol=0)
    return ours


def test_timm_hub_directory_with_architecture(tmp_path, capsys):
    """A directory as timm's own save_for_hf writes it (config.json with architecture + model_args)."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    tm = _noisy(timm.create_model("vit_medium_patch16_reg4_gap_256", pretrained=False, embed_dim=32, depth=2,
                                  num_heads=2, img_size=32, patch_size=8, num_classes=4))
    save_for_hf(tm, tmp_path / "src", safe_serialization=True,
                model_config={"label_names": ["cat", "dog", "emu", "yak"]})
    assert main(["convert", "--from", "timm", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "converted timm weights" in capsys.readouterr().out
    ours = _check_same(tmp_path / "out", tm)
    assert ours.cfg.reg_tokens == 4 and ours.cfg.pooling == "gap"
    assert VisionTransformer.read_class_names(tmp_path / "out") == ["cat", "dog", "emu", "yak"]


def test_timm_bare_safetensors_with_variant(tmp_path):
    """No config.json: --variant (+ --image-size) describes it, the rest comes from the keys."""
    TimmViT = pytest.importorskip("timm.models.vision_transformer").VisionTransformer

    from vitlab.convert import timm_kwargs
    from vitlab.model import parse_variant

    cfg = parse_variant("tutorial", reg_tokens=2, pos_embed_prefix=False)
    tm = _noisy(TimmViT(**timm_kwargs(cfg)))
    save_file(tm.state_dict(), tmp_path / "seed.safetensors")
    argv = ["convert", "--from", "timm", str(tmp_path / "seed.safetensors"), str(tmp_path / "out"),
            "--variant", "tutorial", "--image-size", "32", "--num-classes", "10"]
    assert main(argv) == 0
    assert _check_same(tmp_path / "out", tm).cfg == cfg


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel"])
def test_hf_directory(cls_name, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8,
                                    id2label={0: "ant", 1: "bee", 2: "cow"})
    hf = _noisy(getattr(transformers, cls_name)(config))
    hf.save_pretrained(tmp_path / "src")
    src = tmp_path / "src" / "model.safetensors"  # a file: its config.json is read from beside it
    assert main(["convert", "--from", "hf", str(src), str(tmp_path / "out")]) == 0
    pick = (lambda o: o.logits) if cls_name == "ViTForImageClassification" else (lambda o: o.pooler_output)
    _check_same(tmp_path / "out", hf, pick=pick)
    names = VisionTransformer.read_class_names(tmp_path / "out")
    assert names == (["ant", "bee", "cow"] if cls_name == "ViTForImageClassification" else None)


def _hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _pickle_file(tmp_path):
    (tmp_path / "pt").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "pt" / "pytorch_model.bin")
    return tmp_path / "pt"


@pytest.mark.parametrize("make_src,extra,source,words", [
    (lambda p: p / "nope", [], "timm", "not found"),
    (lambda p: _pickle_file(p) / "pytorch_model.bin", [], "timm", "only .safetensors"),
    (_pickle_file, [], "hf", "only pickled checkpoints"),
    (_hf_dir, [], "timm", "--variant"),  # an HF config names no timm architecture
    (_hf_dir, ["--variant", "tutorial"], "timm", "missing keys"),  # HF keys are not timm keys
    (_hf_dir, ["--image-size", "64"], "hf", "--image-size describes timm"),
    (_hf_dir, ["SAME"], "hf", "is the source directory"),  # would overwrite the source config.json
])
def test_bad_inputs_one_line_exit_2(make_src, extra, source, words, tmp_path, capsys):
    src = make_src(tmp_path)
    capsys.readouterr()  # drop what building the source printed (transformers' progress bar)
    out = src if extra == ["SAME"] else tmp_path / "out"
    extra = [] if extra == ["SAME"] else extra
    assert main(["convert", "--from", source, str(src), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab convert: error:") and words in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_wrong_config_type_for_hf(tmp_path, capsys):
    src = _hf_dir(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "clip"}))
    capsys.readouterr()
    assert main(["convert", "--from", "hf", str(src), str(tmp_path / "out")]) == 2
    assert "model_type 'clip'" in capsys.readouterr().err
