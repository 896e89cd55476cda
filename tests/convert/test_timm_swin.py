"""timm interop for Swin: `from_timm` / `to_timm` / `timm_kwargs` on timm's SwinTransformer, and checkpoints written
by timm itself through `vitlab convert`, against timm's outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")
from timm.models.swin_transformer import SwinTransformer as TimmSwin  # noqa: E402

from helpers import randomise  # noqa: E402
from vitlab.cli import main  # noqa: E402
from vitlab.convert import from_timm, timm_kwargs, to_timm  # noqa: E402
from vitlab.convert.timm import load_timm_checkpoint, timm_class  # noqa: E402
from vitlab.convert.timm_swin import swin_timm_config  # noqa: E402
from vitlab.errors import VitlabError  # noqa: E402
from vitlab.model import SwinConfig, SwinTransformer, load_pretrained, model_config  # noqa: E402

CONFIGS = {
    "swin-test": model_config("swin-test"),
    "swin-cifar_dropouts": model_config("swin-cifar", drop_rate=0.1, attn_drop_rate=0.05, drop_path=0.2),
    "padded_and_clamped": SwinConfig(image_size=40, patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4),
                                     window_size=6, num_classes=7),
    "options": SwinConfig(image_size=32, patch_size=2, embed_dim=24, depths=(1, 3), num_heads=(2, 6), window_size=4,
                          mlp_ratio=2.5, qkv_bias=False, norm_eps=1e-6, global_pool="max", num_classes=0),
}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def images(cfg, n: int = 2) -> torch.Tensor:
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_parity_both_directions(cfg):
    assert timm_class(cfg) is TimmSwin
    theirs = randomise(TimmSwin(**timm_kwargs(cfg)))
    ours = from_timm(theirs)
    assert isinstance(ours, SwinTransformer) and ours.cfg == cfg  # the config is read back exactly
    x = images(cfg)
    with torch.no_grad():
        close(ours.forward_features(x), theirs.forward_features(x))
        close(ours(x), theirs(x))
    mine = randomise(SwinTransformer(cfg), seed=1)
    back = TimmSwin(**timm_kwargs(cfg)).eval()
    back.load_state_dict(to_timm(mine), strict=True)
    with torch.no_grad():
        close(back(x), mine(x))


def test_registered_timm_swin_tiny_reads_as_swin_tiny():
    theirs = randomise(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False))
    ours = from_timm(theirs)
    # timm's class defaults to drop_path_rate 0.1 (a float32 linspace; the config keeps 7 digits)
    assert ours.cfg == model_config("swin-tiny", drop_path=0.1)
    assert ours.cfg.name == "swin_tiny_patch4_window7_224"
    x = images(ours.cfg, 1)
    with torch.no_grad():
        close(ours(x), theirs(x))


def test_timm_hub_directory_through_vitlab_convert(tmp_path, capsys):
    """A directory as timm's own save_for_hf writes it (config.json: architecture + model_args) -> vitlab convert."""
    from timm.models._hub import save_for_hf

    tm = randomise(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                                 window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2), num_classes=4))
    save_for_hf(tm, tmp_path / "src", safe_serialization=True, model_config={"label_names": ["a", "b", "c", "d"]})
    assert main(["convert", "--from", "timm", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "swin_tiny_patch4_window7_224 16w 2-1d 1-2h /2 w4 32px" in capsys.readouterr().out
    ours = load_pretrained(tmp_path / "out")
    assert isinstance(ours, SwinTransformer) and ours.cfg == swin_timm_config(tm)
    assert SwinTransformer.read_class_names(tmp_path / "out") == ["a", "b", "c", "d"]
    x = images(ours.cfg)
    with torch.no_grad():
        close(ours(x), tm(x))
    # the model dir itself is not a timm checkpoint
    assert main(["convert", "--from", "timm", str(tmp_path / "out"), str(tmp_path / "again")]) == 2
    assert "already a vitlab model directory (config.json model_type 'vitlab_swin')" in capsys.readouterr().err


def test_bare_safetensors_with_swin_variant(tmp_path, capsys):
    """No config.json: --variant swin-test names the sizes; the head's rows give the classes."""
    cfg = model_config("swin-test", num_classes=3, qkv_bias=False)
    tm = randomise(TimmSwin(**timm_kwargs(cfg)))
    save_file(tm.state_dict(), tmp_path / "w.safetensors")
    argv = ["convert", "--from", "timm", str(tmp_path / "w.safetensors"), str(tmp_path / "out"),
            "--variant", "swin-test"]
    assert main(argv) == 0
    ours = load_pretrained(tmp_path / "out")
    assert ours.cfg == cfg
    with torch.no_grad():
        close(ours(images(cfg)), tm(images(cfg)))
    # the wrong variant: a strict-load error naming the tensors, one line
    argv[-1] = "swin-cifar"
    argv[4] = str(tmp_path / "out2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "timm weights do not match the model: missing keys: " in err and "shape mismatches" in err
    assert err.count("\n") == 1


def test_load_timm_checkpoint_builds_the_swin_architecture():
    args = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2])
    tm = randomise(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, **args))
    ours = load_timm_checkpoint(tm.state_dict(), {"architecture": "swin_tiny_patch4_window7_224", "num_classes": 5,
                                                  "model_args": args})
    assert isinstance(ours, SwinTransformer)
    with torch.no_grad():
        close(ours(images(ours.cfg)), tm(images(ours.cfg)))


REFUSED = {
    # the last stage's 4x4 grid is one window: timm then shifts only with always_partition
    "always_partition": (dict(always_partition=True), "grid/window/shift"),
    "per_stage_windows": (dict(window_size=[4, 4, 2]), "windows .* differ between stages"),
    "per_stage_mlp_ratio": (dict(mlp_ratio=(4.0, 2.0, 4.0)), "not one mlp_ratio"),
    "head_dim": (dict(head_dim=8), "head_dim"),
    "non_square": (dict(img_size=(32, 48)), "non-square img_size"),
}


@pytest.mark.parametrize("kw, msg", REFUSED.values(), ids=REFUSED.keys())
def test_refuses_what_vitlab_swin_cannot_hold(kw, msg):
    base = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4))
    tm = TimmSwin(**{**base, **kw})
    with pytest.raises(VitlabError, match=msg) as e:
        from_timm(tm)
    assert "\n" not in str(e.value)


def test_a_resized_timm_model_reads_at_its_new_size():
    tm = randomise(TimmSwin(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2)))
    tm.set_input_size(img_size=(48, 48), window_size=8)  # new masks, bias tables resampled to 15x15
    ours = from_timm(tm)
    assert dataclasses.replace(ours.cfg, image_size=32, window_size=4) == SwinConfig(
        image_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), drop_path=0.1)
    x = images(ours.cfg)
    assert x.shape[-1] == 48
    with torch.no_grad():
        close(ours(x), tm(x))
