"""Inference throughput: ONNX Runtime against vitlab eager, side by side in one process, same weights.

For each model (Ti/4, S/4 at 32x32 by default) the vitlab model is exported with `vitlab.export` (the same
path as `vitlab export --to onnx`) and timed, back to back in every repeat, as: vitlab eager fp32, vitlab's
default inference mode (bf16-pure on CPUs with bf16 matmuls), onnxruntime fp32, onnxruntime int8 (dynamic
quantisation of the weights, `onnxruntime.quantization.quantize_dynamic`), and onnxruntime bf16 where its
CPU kernels run the bf16 graph (recorded as unsupported, with the reason, where they do not). Also records
how far the int8 / bf16 logits move from fp32. Writes benchmarks/results/onnx_inference.json and a row per
model in benchmarks/RESULTS.md.

    python benchmarks/onnx_inference.py --models Ti/4 S/4 --repeats 3
    python benchmarks/onnx_inference.py --models tutorial --batch-size 8 --steps 1 --repeats 1 --dry-run  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from results_md import append_rows, table_row

from vitlab.bench import infer_fn, time_side_by_side
from vitlab.export import export_model
from vitlab.model import create_model
from vitlab.speed import default_mode

HERE = Path(__file__).parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bf16_graph(model, out: Path, example: torch.Tensor) -> Path:
    """The model exported in bf16 (weights and activations), input and output still fp32."""

    class Bf16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.to(torch.bfloat16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x.to(torch.bfloat16)).float()

    program = torch.onnx.export(Bf16().eval(), (example,), dynamo=True, verbose=False, input_names=["pixel_values"],
                                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    program.save(str(out), external_data=False)
    return out


def bench_model(variant: str, args) -> dict:
    model = create_model(variant, image_size=args.image_size, num_classes=10, seed=0).eval()
    with tempfile.TemporaryDirectory(prefix="onnx_bench_") as d:
        return _bench(model, variant, Path(d), args)


def _bench(model, variant: str, tmp: Path, args) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model.save_pretrained(tmp / "model")
    log(f"[{variant}] exporting ...")
    export_model(tmp / "model", tmp / "onnx", to="onnx")  # checks onnxruntime against vitlab on the way
    fp32 = tmp / "onnx" / "model.onnx"
    int8 = tmp / "model.int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    x_np = x.numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    sessions = {"onnxruntime fp32": session(fp32, args.threads), "onnxruntime int8": session(int8, args.threads)}
    out = {"variant": variant, "params": model.num_params(), "unsupported": {}, "max_abs_logit_diff_vs_fp32": {}}
    try:
        sessions["onnxruntime bf16"] = session(bf16_graph(create_model(variant, image_size=args.image_size,
                                                                       num_classes=10, seed=0).eval(),
                                                          tmp / "model.bf16.onnx", x[:2]), args.threads)
        sessions["onnxruntime bf16"].run(None, {"pixel_values": x_np[:2]})
    except Exception as e:  # onnxruntime's CPU provider lacks bf16 kernels for some ops: record which
        sessions.pop("onnxruntime bf16", None)
        first = str(e).splitlines()[0].replace(str(tmp), "")[:240]
        out["unsupported"]["onnxruntime bf16"] = f"{type(e).__name__}: {first}"
        log(f"[{variant}] onnxruntime bf16 unsupported: {out['unsupported']['onnxruntime bf16']}")
    for name, s in sessions.items():
        out["max_abs_logit_diff_vs_fp32"][name] = float(np.abs(s.run(None, {"pixel_values": x_np})[0] - ref).max())
    default = default_mode(torch.device("cpu"))
    common = dict(batch_size=args.batch_size, image_size=args.image_size)
    fns = {"vitlab eager fp32": infer_fn(model, precision="fp32", compile=False, **common),
           f"vitlab default ({default['precision']})": infer_fn(
               create_model(variant, image_size=args.image_size, num_classes=10, seed=0), **default, **common)}
    fns.update({name: (lambda s=s: s.run(None, {"pixel_values": x_np})[0]) for name, s in sessions.items()})
    t = time_side_by_side(fns, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                          progress=lambda m: log(f"[{variant}] {m}"))
    out["images_per_sec"] = {k: {"median": v.median, "min": v.min, "best": v.best, "all": v.images_per_sec}
                             for k, v in t.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["Ti/4", "S/4"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="calls per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="onnxruntime intra-op threads "
                                                                               "(default: torch's)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "onnx_inference.json")
    p.add_argument("--dry-run", action="store_true", help="print the rows; write no JSON and no RESULTS.md row")
    args = p.parse_args()

    import onnxruntime

    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "threads": args.threads, "torch_threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "batch_size": args.batch_size,
              "models": [bench_model(v, args) for v in args.models]}
    rows = []
    for m in result["models"]:
        ips = {k: v["median"] for k, v in m["images_per_sec"].items()}
        base = ips["vitlab eager fp32"]
        cells = "; ".join(f"{k} {v:.0f} ({v / base:.2f}x)" for k, v in ips.items())
        drift = ", ".join(f"{k.removeprefix('onnxruntime ')} {v:.1e}"
                          for k, v in m["max_abs_logit_diff_vs_fp32"].items())
        missing = "; ".join(f"{k}: unsupported ({v})" for k, v in m["unsupported"].items())
        rows.append(table_row([
            "onnx_inference", result["date"],
            f"{m['variant']} infer, batch {args.batch_size}, {args.threads} threads, torch {result['torch']}, "
            f"onnxruntime {result['onnxruntime']}",
            f"onnxruntime fp32 {ips['onnxruntime fp32']:.0f} img/s vs vitlab eager fp32 {base:.0f} img/s = "
            f"**{ips['onnxruntime fp32'] / base:.2f}x**",
            f"img/s, median of {args.repeats} (x vitlab eager fp32): {cells}; max abs logit difference from "
            f"vitlab fp32: {drift}"
            + (f"; {missing}" if missing else ""),
        ]))
    print("\n".join(rows))
    if not args.dry_run:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        append_rows(rows)
        log(f"wrote {args.out} and {len(rows)} RESULTS.md rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
