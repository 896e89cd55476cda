"""Export a vitlab model directory to where the ecosystem can use it: Hugging Face, timm or ONNX.

    result = export_model("runs/fast", "out/hf", to="hf")   # ViTForImageClassification / CLIPModel / SiglipModel
    result.max_diff                                          # outputs of the exported model vs ours (when checked)

Each format writes into a temporary dir beside OUT; the export is loaded back there with the target library
when it is installed (transformers, timm, onnxruntime) and compared with the vitlab model on a random batch;
only then is it renamed to OUT, so a half-written or failed export never looks like a model. OUT must be new
or empty: a run dir is refused, and so is any other content, except an earlier export of the same format
(recognised by its vitlab_export.json) with `force`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vitlab.errors import VitlabError
from vitlab.modeldir import ModelDir, open_model_dir
from vitlab.rundir import EXPORT_RECORD, RUN_MARKS
from vitlab.weights import _umask, read_json, write_json

FORMATS = ("hf", "timm", "onnx")
# library that loads each format back, for the check
CHECKED_WITH = {"hf": "transformers", "timm": "timm", "onnx": "onnxruntime"}
EXPORTABLE = ("vit", "swin", "clip", "siglip")  # the kinds of model dir (vitlab.modeldir) the formats write
TOLERANCE = 1e-4  # fp32 outputs of the export vs ours; more is a bug in the export, not float rounding


@dataclass
class ExportResult:
    out: Path
    format: str
    source: ModelDir
    max_diff: float | None = None  # None: not checked (library not installed, or check=False)
    notes: list[str] = field(default_factory=list)


def export_model(model_dir: str | Path, out: str | Path, *, to: str, check: bool = True,
                 force: bool = False) -> ExportResult:
    if to not in FORMATS:
        raise VitlabError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    src = open_model_dir(model_dir).require(EXPORTABLE, "vitlab export")
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise VitlabError(f"OUT {out} is the model directory itself; export into another directory")
    check_target(out, to, force=force)
    if to == "hf":
        from vitlab.export.hf import check_hf as check_fn
        from vitlab.export.hf import export_hf as export_fn
    elif to == "timm":
        from vitlab.export.timm import check_timm as check_fn
        from vitlab.export.timm import export_timm as export_fn
    else:
        from vitlab.export.onnx import check_onnx as check_fn
        from vitlab.export.onnx import export_onnx as export_fn
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent))
    try:
        result = ExportResult(out, to, src, notes=export_fn(src, tmp))
        write_json(tmp / EXPORT_RECORD, {"format": to, "source": str(src.path),
                                         "files": sorted(p.name for p in tmp.iterdir())})
        if check:
            result.max_diff = check_fn(src, tmp)
            if result.max_diff is None:
                result.notes.append(f"{CHECKED_WITH[to]} is not installed: the export was not loaded back to check it")
            elif result.max_diff > TOLERANCE:
                raise VitlabError(f"the {to} export differs from the vitlab model by {result.max_diff:.3g}: "
                                  "not written (a bug in the export; please report it)")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def check_target(out: Path, to: str, *, force: bool) -> None:
    """Refuse an OUT that is a run dir or holds anything but an earlier export of this format (that with force)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise VitlabError(f"OUT {out} exists and is not a directory")
    names = sorted(p.name for p in out.iterdir())
    marks = [n for n in RUN_MARKS if n in names]
    if marks:
        raise VitlabError(f"OUT {out} is a vitlab run dir (it holds {', '.join(marks)}); export into a new directory")
    if not names:
        return
    if EXPORT_RECORD not in names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise VitlabError(f"OUT {out} already holds files that are not a vitlab export ({shown}); export into a new "
                          "or empty directory")
    earlier = read_json(out / EXPORT_RECORD).get("format")
    if earlier != to:
        raise VitlabError(f"OUT {out} holds an earlier {earlier} export, not {to}; export into another directory")
    if not force:
        raise VitlabError(f"OUT {out} holds an earlier {to} export; --force replaces it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export to OUT; an earlier export there is swapped out, files it did not write are kept."""
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would have made
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(tmp.name.replace(".export-tmp", ".export-old"))
    earlier = set(read_json(out / EXPORT_RECORD).get("files", [])) | {EXPORT_RECORD}
    out.rename(old)
    tmp.rename(out)
    for p in old.iterdir():  # the user's own files beside the earlier export stay
        if p.name not in earlier and not (out / p.name).exists():
            p.rename(out / p.name)
    shutil.rmtree(old)


__all__ = ["FORMATS", "ExportResult", "ModelDir", "export_model", "open_model_dir"]
