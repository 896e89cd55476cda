import json

import pytest

from vitlab.cli import main


def test_info_json_reports_timm_equal_params(capsys):
    assert main(["info", "Ti/4", "--image-size", "32", "--num-classes", "10", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 5_362_762 and info["tokens"] == 65
    assert info["gflops_per_image_train"] == pytest.approx(3 * info["gflops_per_image_forward"])


def test_info_reads_saved_dir(tmp_path, capsys):
    from vitlab import create_model

    create_model("tutorial").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "119,194" in out and "65 (class 1, registers 0)" in out


@pytest.mark.parametrize("argv, words", [
    (["info", "Q/7"], "unknown model variant"),
    (["info", "Ti/5", "--image-size", "32"], "not divisible"),
    (["info", "tutorial", "--batch-size", "0"], "batch-size"),
])
def test_info_bad_input_one_line_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_module_entry_point_runs():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vitlab", "info", "nope/3"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("vitlab info: error:") and "Traceback" not in r.stderr
