"""Export a vitlab model directory to where the ecosystem can use it: Hugging Face, timm or ONNX.

    result = export_model("runs/fast", "out/hf", to="hf")   # ViTForImageClassification / CLIPModel / SiglipModel
    result.max_diff                                          # outputs of the exported model vs ours (when checked)

Each format writes its files atomically, config.json last. After writing, the export is loaded back with
the target library when it is installed (transformers, timm, onnxruntime) and compared with the vitlab model
on a random batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitlab.errors import VitlabError
from vitlab.export.source import ModelDir, open_model_dir

FORMATS = ("hf", "timm", "onnx")
# library that loads each format back, for the check
CHECKED_WITH = {"hf": "transformers", "timm": "timm", "onnx": "onnxruntime"}
TOLERANCE = 1e-4  # fp32 outputs of the export vs ours; more is a bug in the export, not float rounding


@dataclass
class ExportResult:
    out: Path
    format: str
    source: ModelDir
    max_diff: float | None = None  # None: not checked (library not installed, or check=False)
    notes: list[str] = field(default_factory=list)


def export_model(model_dir: str | Path, out: str | Path, *, to: str, check: bool = True) -> ExportResult:
    if to not in FORMATS:
        raise VitlabError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    src = open_model_dir(model_dir)
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise VitlabError(f"OUT {out} is the model directory itself; export into another directory")
    if out.exists() and not out.is_dir():
        raise VitlabError(f"OUT {out} exists and is not a directory")
    if to == "hf":
        from vitlab.export.hf import check_hf as check_fn
        from vitlab.export.hf import export_hf as export_fn
    elif to == "timm":
        from vitlab.export.timm import check_timm as check_fn
        from vitlab.export.timm import export_timm as export_fn
    else:
        from vitlab.export.onnx import check_onnx as check_fn
        from vitlab.export.onnx import export_onnx as export_fn
    result = ExportResult(out, to, src, notes=export_fn(src, out))
    if check:
        result.max_diff = check_fn(src, out)
        if result.max_diff is None:
            result.notes.append(f"{CHECKED_WITH[to]} is not installed: the export was not loaded back to check it")
        elif result.max_diff > TOLERANCE:
            raise RuntimeError(f"the {to} export in {out} differs from the vitlab model by {result.max_diff:.3g}")
    return result


__all__ = ["FORMATS", "ExportResult", "ModelDir", "export_model", "open_model_dir"]
