"""`vitlab export`: what the user sees, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import pytest

from vitlab.cli import main


def test_export_hf_prints_files_and_the_check(vit_dir, tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'vitlab[dev]')")
    assert main(["export", str(vit_dir()), str(tmp_path / "hf"), "--to", "hf"]) == 0
    out = capsys.readouterr().out
    assert "config.json, model.safetensors, preprocessor_config.json" in out
    assert "checked: the export's outputs differ from vitlab's by at most" in out


@pytest.mark.parametrize("args,words", [
    (["missing_dir", "out", "--to", "hf"], "not found"),
    (["{run}", "{run}", "--to", "timm"], "is the model directory itself"),
    (["{registers}", "out", "--to", "hf"], "register tokens"),
], ids=["missing", "out_is_source", "no_equivalent"])
def test_bad_input_is_one_line_and_exit_2(args, words, vit_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = {"run": str(vit_dir()), "registers": str(vit_dir("registers", reg_tokens=1))}
    assert main(["export", *(a.format(**dirs) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitlab export: error:") and words in err and "\n" not in err


def test_export_needs_a_format(vit_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(vit_dir()), "out"])
    assert e.value.code == 2 and "--to" in capsys.readouterr().err
