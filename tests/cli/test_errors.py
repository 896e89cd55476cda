"""The CLI's error net: user errors are one line and exit 2, bugs keep their traceback; every command gives one
line on a bad image; a full disk is one line; absurd model configs fail without allocating."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import vitlab.cli.info
from test_images import png_header_only  # tests/ is on sys.path (it holds the rootdir conftest)
from vitlab.cli import main, nonempty
from vitlab.errors import VitlabError
from vitlab.model import create_model, parse_variant
from vitlab.model.flops import check_model_size, estimate_params
from vitlab.rundir import write_preprocessor_config


def one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vitlab {command}: error: "), err
    return err


@pytest.mark.parametrize("exc", [VitlabError("bad --thing"), FileNotFoundError(errno.ENOENT, "No such file", "x"),
                                 OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"),
                                 FileExistsError(errno.EEXIST, "File exists", "/out"),
                                 PermissionError(errno.EACCES, "Permission denied", "/root/x")])
def test_user_errors_are_one_line_exit_2(monkeypatch, capsys, exc):
    def run(args):
        raise exc

    monkeypatch.setattr(vitlab.cli.info, "run", run)
    assert main(["info", "Ti/4"]) == 2
    err = one_line_error(capsys, "info")
    assert (str(exc) if isinstance(exc, VitlabError) else f"{exc.filename}: {exc.strerror}") in err


@pytest.mark.parametrize("exc", [KeyError("rng"), ValueError("internal"), TypeError("bug"),
                                 OSError(errno.ECONNRESET, "Connection reset")])
def test_bugs_keep_their_traceback(monkeypatch, exc):
    def run(args):
        raise exc

    monkeypatch.setattr(vitlab.cli.info, "run", run)
    with pytest.raises(type(exc)):
        main(["info", "Ti/4"])


def test_nonempty_path_option():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--resume", type=nonempty)
    assert p.parse_args(["--resume", "runs/a"]).resume == "runs/a"
    with pytest.raises(SystemExit):
        p.parse_args(["--resume", ""])


def test_config_field_of_the_wrong_type_names_file_and_field(tmp_path, capsys):
    create_model("test", seed=0).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "width": "16"}))
    assert main(["info", str(tmp_path)]) == 2
    assert "config.json: ViTConfig field 'width' must be an integer, got '16'" in one_line_error(capsys, "info")


# ---- images: every command gives one line -----------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from vitlab.clip import CLIPConfig, TextConfig, create_clip
    from vitlab.clip.tokenizer import ByteTokenizer
    from vitlab.model import ViTConfig
    from vitlab.preprocess import siglip_preprocess

    root = tmp_path_factory.mktemp("errors")
    run = root / "run"
    create_model("test", seed=0).save_pretrained(
        run, class_names=[str(i) for i in range(10)])
    write_preprocessor_config(run, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    tok = ByteTokenizer(context_length=16)
    vision = ViTConfig(image_size=16, patch_size=4, num_classes=0, width=16, depth=1, heads=2, mlp_dim=32,
                       class_token=False, pooling="map")
    text = TextConfig(vocab_size=tok.vocab_size, context_length=16, width=16, depth=1, heads=2, mlp_dim=32,
                      causal=False, pooling="last", eos_token_id=tok.EOS)
    create_clip(CLIPConfig(vision=vision, text=text, kind="siglip", embed_dim=16), seed=0).save_pretrained(
        root / "clip", tokenizer=tok, preprocess=siglip_preprocess(16))
    png_header_only(root / "bomb.png", 9000, 9000)
    good = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good)
    (root / "cut.png").write_bytes(good.read_bytes()[:100])
    (root / "text.png").write_text("hello")
    return root


@pytest.mark.parametrize("command", ["predict", "explain", "zeroshot"])
@pytest.mark.parametrize("image, words", [("bomb.png", "over the limit"), ("cut.png", "truncated"),
                                          ("text.png", "cannot identify image file")])
def test_every_command_gives_one_line_on_a_bad_image(dirs, capsys, command, image, words):
    pytest.importorskip("matplotlib") if command == "explain" else None
    argv = {"predict": ["predict", str(dirs / "run"), str(dirs / image)],
            "explain": ["explain", str(dirs / "run"), str(dirs / image), "--out", str(dirs / "explain")],
            "zeroshot": ["zeroshot", str(dirs / "clip"), str(dirs / image), "--classes", "cat,dog"]}[command]
    assert main(argv) == 2
    err = one_line_error(capsys, command)
    assert image in err and words in err


def test_an_output_path_that_is_a_file_is_one_line(dirs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "taken").write_text("a file")
    assert main(["explain", str(dirs / "run"), str(dirs / "good.png"), "--out", str(tmp_path / "taken")]) == 2
    assert f"{tmp_path / 'taken'}: File exists" in one_line_error(capsys, "explain")


# ---- a full disk ------------------------------------------------------------------------------------------
FULL_DISK = textwrap.dedent("""
    import errno, json, sys
    from pathlib import Path
    from vitlab.cli import main
    from vitlab.model import create_model
    from vitlab.train import checkpoint as ckpt
    mnt, run, image = sys.argv[1:4]
    model = create_model("tutorial", seed=0, width=96, depth=2, heads=2, mlp_dim=192)  # ~0.6 MB per save
    ckpt.save_checkpoint(mnt + "/run", tensors={"model": model.state_dict()}, state={"step": 1})
    report = {}
    try:
        ckpt.save_checkpoint(mnt + "/run", tensors={"model": model.state_dict()}, state={"step": 2})
    except OSError as e:
        report["enospc"], report["file"] = e.errno == errno.ENOSPC, e.filename
    report["kept_step"] = ckpt.load_checkpoint(mnt + "/run")[1]["step"]
    report["entries"] = sorted(p.name for p in Path(mnt, "run", "checkpoint").iterdir())
    print(json.dumps(report), flush=True)
    sys.exit(main(["explain", run, image, "--out", mnt + "/explain"]))
""")


def test_disk_full_on_a_small_tmpfs(dirs, tmp_path):
    """A real full disk (a private 900 KiB tmpfs): the failed save keeps the last checkpoint and leaves no
    debris; a command that runs out of space says so in one line."""
    pytest.importorskip("matplotlib")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or user namespaces): {probe.stderr.strip()}")
    cmd = f"mount -t tmpfs -o size=900k tmpfs {mnt} && exec {sys.executable} {script} {mnt} {dirs / 'run'} " \
          f"{dirs / 'good.png'}"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True,
                       env={**os.environ, "MPLBACKEND": "Agg"})
    report = json.loads(r.stdout.splitlines()[0])
    assert report["enospc"] and report["file"].endswith("model.safetensors"), r.stderr
    assert report["kept_step"] == 1 and len(report["entries"]) == 2  # latest.json + the good folder only
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("No space left on device")


# ---- model size -------------------------------------------------------------------------------------------
def test_size_check_compares_with_available_memory():
    cfg = parse_variant("B/16")
    need = check_model_size(cfg, available=10**12)
    assert need == 4 * estimate_params(cfg)
    with pytest.raises(VitlabError, match=r"needs ~330.2 MiB .* but ~100.0 MiB of memory is available"):
        check_model_size(cfg, available=100 * 2**20)
    with pytest.raises(VitlabError, match="training at batch 256"):
        check_model_size(cfg, batch_size=256, training=True, available=2**30)


def test_size_check_reads_the_override(monkeypatch):
    cfg = parse_variant("B/16")
    monkeypatch.setenv("VITLAB_MEMORY_LIMIT", "64M")
    with pytest.raises(VitlabError, match="64.0 MiB of memory is available; set VITLAB_MEMORY_LIMIT"):
        check_model_size(cfg)
    monkeypatch.setenv("VITLAB_MEMORY_LIMIT", "off")
    assert check_model_size(cfg) > 0
    monkeypatch.setenv("VITLAB_MEMORY_LIMIT", "lots")
    with pytest.raises(VitlabError, match="expected a size such as 8G"):
        check_model_size(cfg)


def test_parameter_estimate_matches_the_built_model():
    import torch

    from vitlab.model import VisionTransformer

    for variant, kw in [("Ti/16", {}), ("B/16", dict(pooling="map", class_token=False)), ("H/14", {}),
                        ("g/14", dict(reg_tokens=4, pre_logits_dim=256)), ("tutorial", {})]:
        cfg = parse_variant(variant, **kw)
        with torch.device("meta"):
            n = VisionTransformer(cfg).num_params()
        assert n <= estimate_params(cfg) <= n * 1.001, variant  # exact up to LayerNorm/bias bookkeeping


PEAK_RSS = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from vitlab.cli import main
    rc = main(sys.argv[1:])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (pytest, maybe > 1 GiB)
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"rc": rc, "peak_kib": peak}))
""")


def peak_rss(argv):
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.fixture(scope="module")
def baseline():
    result, err = peak_rss(["info", "H/14"])  # a real large model, described on the meta device
    assert result["rc"] == 0, err
    return result


@pytest.mark.parametrize("fields", [dict(width=10**9, heads=8, mlp_dim=4), dict(depth=10**6),
                                    dict(image_size=10**6, patch_size=1)])
def test_absurd_configs_fail_in_info_without_allocating(tmp_path, baseline, fields):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(parse_variant("Ti/16", **fields).to_dict()))
    result, err = peak_rss(["info", str(tmp_path / "m")])
    assert result["rc"] == 2 and "is not buildable" in err and err.count("\n") == 1
    assert result["peak_kib"] < baseline["peak_kib"] + 50 * 1024  # no more than describing H/14 took


CREATE = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))  # unguarded, building would allocate: bound it
    from vitlab.errors import VitlabError
    from vitlab.model import create_model
    try:
        create_model("Ti/16", **{sys.argv[1]: int(sys.argv[2])})
    except VitlabError as e:
        print("refused:", e)
    except RuntimeError as e:  # what building it did before: the allocator gave up
        print("allocator:", e)
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))  # see PEAK_RSS
""")


@pytest.mark.parametrize("field, value", [("width", 3 * 10**8), ("depth", 10**6)])  # valid, absurd (Ti: 3 heads)
def test_create_model_refuses_before_allocating(field, value):
    r = subprocess.run([sys.executable, "-c", CREATE, field, str(value)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    lines = r.stdout.splitlines()
    assert lines and lines[0].startswith("refused:"), r.stderr[-500:]
    assert int(lines[-1]) < 1024 * 1024  # KiB: well under 1 GiB peak
