"""`--to timm` for a Swin model dir: timm loads the export strictly with our outputs, and `vitlab convert` reads it
back. The dir is opened by `open_model_dir`, as `vitlab export` opens it."""

from __future__ import annotations

import json

import pytest
import torch

from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.export.timm import check_timm, export_timm, timm_hub_config
from vitlab.model import SwinTransformer, create_model, load_pretrained
from vitlab.modeldir import ModelDir, open_model_dir
from vitlab.rundir import write_preprocessor_config

NAMES = ["apple", "bee", "cat", "dog", "eel"]


@torch.no_grad()
def swin_dir(tmp_path, **overrides) -> ModelDir:
    """A swin-test dir as training leaves it (weights, id2label, preprocessor_config.json), every parameter
    shifted off its init, opened by `open_model_dir`."""
    model = create_model("swin-test", seed=0, num_classes=5, **overrides)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    d = tmp_path / "run"
    model.save_pretrained(d, class_names=NAMES)
    write_preprocessor_config(d, image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    md = open_model_dir(d)
    assert md.kind == "swin" and isinstance(md.model, SwinTransformer) and md.class_names == NAMES
    return md


def test_timm_loads_the_swin_export_and_vitlab_reads_it_back(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'vitlab[dev]')")
    src = swin_dir(tmp_path)
    out = tmp_path / "timm"
    export_timm(src, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "swin_tiny_patch4_window7_224" and config["model_args"]["depths"] == [1, 1]
    assert config["pretrained_cfg"]["classifier"] == "head.fc"
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(theirs).__name__ == "SwinTransformer" and theirs.pretrained_cfg["label_names"] == NAMES
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), src.model(x), atol=1e-5, rtol=0)
    assert check_timm(src, out) < 1e-5
    assert main(["convert", "--from", "timm", str(out), str(tmp_path / "back")]) == 0
    back = load_pretrained(tmp_path / "back")
    assert isinstance(back, SwinTransformer) and back.cfg == src.model.cfg
    assert SwinTransformer.read_class_names(tmp_path / "back") == NAMES
    with torch.no_grad():
        torch.testing.assert_close(back(x), src.model(x), atol=0, rtol=0)


def test_a_layernorm_eps_timm_cannot_name_is_refused(tmp_path):
    with pytest.raises(VitlabError, match="timm's Swin uses 1e-05") as e:
        timm_hub_config(swin_dir(tmp_path, norm_eps=1e-6))
    assert "\n" not in str(e.value)
