"""Wall-clock minutes to reach 64/70/80/85/90% CIFAR-10 test top-1 for training recipes, and ablations.

    python benchmarks/cifar10_time_to_accuracy.py [RECIPE ...] [--set KEY=VALUE ...] [--tag NAME]
    python benchmarks/cifar10_time_to_accuracy.py --ablation fast --minutes 5
    python benchmarks/cifar10_time_to_accuracy.py sprint --ref-minutes 3

Each run is `vitlab train --recipe NAME` in a fresh process, as a user starts it, so its time budget and
the times here count from the process start (imports, data loading, evaluations, saving and a
distillation teacher's training all included). A threshold's time is the end of the first epoch whose
test top-1 reaches it (metrics.jsonl `elapsed_s`); the final top-1 is reported without and, where the
recipe asks for it, with test-time augmentation. `--ablation BASE` runs BASE and then each lever of
issue 12 (or those named by `--only`) switched on alone over it, all at the same `--minutes` budget, and
tabulates the deltas; `--base-run DIR --base-peak N` reads the base from a finished run of the same command
(the vitlab run of `BASE --peers --minutes M`) instead of training it again. `--ref-minutes N` gives each
recipe a budget of N reference minutes: N x 821 / the bf16 peak measured just before it, in wall minutes.
`RECIPE --peers --minutes M` runs the recipe, then timm's VisionTransformer of the same width and depth and a
32 px ResNet-18 in the plain PyTorch loop of benchmarks/peers.py, each for M minutes in its own process, back to
back on this machine, and reports vitlab's lead over the timm ViT in points (ViT recipes only).
Swin against the conv-stem and the patchify ViT at equal wall clock (issue 22): `swin-sprint sprint sprint-pure`
(all 3-minute budgets) and `swin-fast fast fast-pure --set time-budget=15`.
Writes benchmarks/results/*.json and rows in benchmarks/RESULTS.md. Run it on a quiet machine: a
shared CPU can halve the throughput.

Each result records the machine's bf16 matmul peak, measured just before the run (`--peak N` reuses a known
value), its reference minutes (wall minutes x peak / 821 GFLOP/s, the machine behind RESULTS.md) and the MFU
of its training steps against that peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_md import RESULTS_MD, append_rows, table_row

from vitlab.bench import matmul_peak, reference_minutes, run_mfu, wall_minutes_for
from vitlab.model import VisionTransformer, ViTConfig, model_class, model_config
from vitlab.train.resize import ResizeSchedule

THRESHOLDS = (0.64, 0.70, 0.80, 0.85, 0.90)
HERE = Path(__file__).resolve().parent

# Issue 12's levers, each switched on alone over the ablation's base recipe (vitlab train flags).
LEVERS = {
    "conv stem": ["--model-arg", "stem=conv"],
    "muon": ["--optimizer", "muon"],
    "progressive resizing 16px->32px": ["--resize-schedule", "16:0.5"],
    "distillation (teacher stage)": ["--teacher", "stage", "--model-arg", "distill_token=true"],
    "gap pooling": ["--model-arg", "pooling=gap", "--model-arg", "class_token=false"],
    "sequence pooling": ["--model-arg", "pooling=seq", "--model-arg", "class_token=false"],
    "mlp ratio 4": ["--model-arg", "mlp_dim=512"],
    "alternating flip": ["--alternate-flip"],
    "label smoothing 0.2": ["--label-smoothing", "0.2"],
    "ema 0.999": ["--ema", "0.999"],
    "linear decay": ["--decay", "linear"],
    "tta flip-translate": ["--tta", "flip-translate"],
    # issue 21's levers for the 15-minute ablation over `fast` (distillation and EMA are above)
    "trivialaugment": ["--policy", "trivial"],
    "randaugment": ["--policy", "randaug"],
    "one-cycle": ["--decay", "onecycle"],
    "wider conv stem (64, 128)": ["--model-arg", "stem_channels=64,128"],
}


def minutes_to(rows: list[dict], threshold: float, key: str = "test_top1") -> float | None:
    """Minutes at the end of the first epoch whose test top-1 is >= threshold, None if never."""
    for r in rows:
        if r.get(key) is not None and r[key] >= threshold:
            return round(r["elapsed_s"] / 60, 2)
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bf16_peak(known: float | None) -> float:
    """This machine's bf16 matmul peak in GFLOP/s, measured now (its speed drifts) unless `known` is given."""
    return known if known else matmul_peak(torch.bfloat16)


def run(recipe: str, flags: list[str], *, run_dir: Path, data: str | None, peak: float | None = None) -> dict:
    """`vitlab train --recipe RECIPE FLAGS` in a new process; the numbers of its run dir, with the machine's
    bf16 peak (measured just before, unless `peak` is given), reference minutes and MFU."""
    peak_gflops = bf16_peak(peak)
    cmd = [sys.executable, "-m", "vitlab", "train", "--recipe", recipe, "--out", str(run_dir), "--no-progress",
           *(["--data", data] if data else []), *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    return {**read_run(run_dir, recipe=recipe, flags=flags, command=" ".join(["vitlab", *cmd[3:]]), wall_s=wall,
                       peak_gflops=peak_gflops), "peak_measured": not peak}


def read_run(run_dir: Path, *, recipe: str, flags: list[str], command: str, wall_s: float | None,
             peak_gflops: float) -> dict:
    """The numbers of a finished run dir, with reference minutes and MFU against `peak_gflops`."""
    rows = read_rows(run_dir / "metrics.jsonl")
    record = json.loads((run_dir / "train_config.json").read_text())
    final = rows[-1]
    teacher = run_dir / "teacher" / "metrics.jsonl"
    teacher_rows = read_rows(teacher) if teacher.is_file() else []
    to = {f"{round(t * 100)}%": minutes_to(rows, t) for t in THRESHOLDS}
    return {
        "recipe": recipe, "flags": flags, "command": command,
        "minutes_to": to,
        "peak_gflops": round(peak_gflops, 1),
        "reference_minutes": round(reference_minutes(final["elapsed_s"] / 60, peak_gflops), 2),
        "reference_minutes_to": {k: None if v is None else round(reference_minutes(v, peak_gflops), 2)
                                 for k, v in to.items()},
        "mfu": round(mfu_of(record, rows, peak_gflops), 4),
        "final_test_top1": final["test_top1"], "final_test_top1_tta": final.get("test_top1_tta"),
        "final_test_top5": final["test_top5"], "best_test_top1": max(r["test_top1"] for r in rows),
        "epochs": final["epoch"], "steps": final["step"],
        "wall_minutes": round((wall_s if wall_s is not None else final["elapsed_s"]) / 60, 2),
        "run_minutes": round(final["elapsed_s"] / 60, 2),
        "train_images_per_sec": round(statistics.median(r["images_per_sec"] for r in rows), 1),
        "teacher_minutes": round(teacher_rows[-1]["elapsed_s"] / 60, 2) if teacher_rows else None,
        "teacher_test_top1": teacher_rows[-1]["test_top1"] if teacher_rows else None,
        "params": record["model"]["params"], "model_config": record["model"]["config"],
        "model_type": record["model"].get("model_type", VisionTransformer.model_type),
        "config": record["config"], "plan": record["plan"], "device": record["device"],
        "per_epoch": [{k: r.get(k) for k in ("epoch", "elapsed_s", "test_top1")} for r in rows],
        "run_dir": str(run_dir),
    }


def recorded_config(record: dict):
    """The run's model config from train_config.json, of the class its model_type names (a ViT's before
    model_type was recorded)."""
    model = record["model"]
    return model_class(model.get("model_type", VisionTransformer.model_type)).config_class.from_dict(model["config"])


def model_kind(res: dict) -> str:
    """The family of another registered model ("vitlab_swin" -> "Swin"), or the ViT's stem: "conv stem" / "patchify"."""
    model_type = res.get("model_type", VisionTransformer.model_type)
    if model_type != VisionTransformer.model_type:
        return model_type.removeprefix("vitlab_").capitalize()
    return "conv stem" if res["model_config"].get("stem") == "conv" else "patchify"


def mfu_of(record: dict, rows: list[dict], peak_gflops: float) -> float:
    """The run's training-step MFU against `peak_gflops`, each step counted at its input size."""
    cfg, config = recorded_config(record), record["config"]
    sizes = (ResizeSchedule.parse(config["resize_schedule"], full=cfg.image_size)
             if config.get("resize_schedule") else None)
    total = rows[-1]["step"]
    return run_mfu(cfg, rows, batch_size=record["plan"]["global_batch_size"], peak_gflops=peak_gflops,
                   size_at=(lambda step: sizes.size_at(step, total)) if sizes else None)


def run_peer(peer: str, *, minutes: float, model: ViTConfig, out: Path, data: str | None, peak: float | None,
             lr: float | None = None, flags: tuple[str, ...] = ()) -> dict:
    """benchmarks/peers.py PEER [FLAGS] in a new process, for `minutes` from its start; its entry, with the
    machine's bf16 peak (measured just before, unless `peak` is given) and reference minutes."""
    peak_gflops = bf16_peak(peak)
    cmd = [sys.executable, str(HERE / "peers.py"), peer, "--minutes", f"{minutes:g}", "--out", str(out),
           *(["--data", data] if data else []), *(["--lr", f"{lr:g}"] if lr else []), *flags]
    if peer == "timm-vit":
        cmd += ["--width", str(model.width), "--depth", str(model.depth), "--heads", str(model.heads),
                "--mlp-dim", str(model.mlp_dim)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    entry = json.loads(out.read_text())
    return {"peer": peer, **entry, "peak_gflops": round(peak_gflops, 1),
            "reference_minutes": round(reference_minutes(entry["minutes"], peak_gflops), 2),
            "command": " ".join(["python", "benchmarks/peers.py", *cmd[2:]])}


def vitlab_entry(recipe: str, res: dict) -> dict:
    """A vitlab run's numbers as a peers entry (top1 without TTA, as the peers have none; top1_tta beside)."""
    return {"peer": "vitlab", "name": f"vitlab {recipe}", "top1": res["final_test_top1"],
            "top1_tta": res["final_test_top1_tta"], "steps": res["steps"],
            "epochs": res["steps"] / res["plan"]["steps_per_epoch"], "img_per_s": res["train_images_per_sec"],
            "peak_gflops": res["peak_gflops"], "minutes": res["run_minutes"],
            "reference_minutes": res["reference_minutes"], "mfu": res["mfu"], "precision": res["plan"]["precision"],
            "command": res["command"]}


def lead_points(runs: list[dict], over: str = "timm-vit") -> float | None:
    """vitlab's test top-1 minus the `over` peer's, in points (None when either is missing)."""
    top1 = {r["peer"]: r["top1"] for r in runs}
    return round(100 * (top1["vitlab"] - top1[over]), 2) if "vitlab" in top1 and over in top1 else None


def peers_table(runs: list[dict]) -> str:
    lines = [f"{'run':<28} {'top-1':>7} {'steps':>6} {'epochs':>6} {'img/s':>6} {'min':>6} {'ref min':>7} "
             f"{'peak GF/s':>9}"]
    for r in runs:
        lines.append(f"{r['name']:<28} {r['top1']:7.2%} {r['steps']:6d} {r['epochs']:6.2f} {r['img_per_s']:6.0f} "
                     f"{r['minutes']:6.2f} {r['reference_minutes']:7.2f} {r['peak_gflops']:9.0f}")
    lead = lead_points(runs)
    if lead is not None:
        lines.append(f"vitlab's lead over the timm ViT: {lead:+.2f} points")
    if (cnn := lead_points(runs, over="resnet18")) is not None:
        lines.append(f"vitlab's lead over ResNet-18: {cnn:+.2f} points")
    return "\n".join(lines)


def run_peers(recipe: str, args, extra: list[str], env: dict, stamp: str) -> Path:
    """The recipe, the timm ViT and the ResNet-18, each for args.minutes, back to back; the results file."""
    from vitlab.train import resolve_recipe

    rc = resolve_recipe(recipe)
    model = model_config(rc.model, **rc.model_args)
    if not isinstance(model, ViTConfig):
        raise SystemExit(f"--peers pits a ViT recipe against timm's ViT of the same width and depth; {recipe} "
                         f"trains {rc.model}, which has no such twin")
    res = run(recipe, ["--time-budget", f"{args.minutes:g}", *extra], run_dir=args.runs_dir / f"peers-{recipe}-{stamp}",
              data=args.data, peak=args.peak)
    runs = [vitlab_entry(recipe, res)]
    print(json.dumps({recipe: describe(res)}), flush=True)
    for peer in ("timm-vit", "resnet18"):
        out = args.runs_dir / f"peers-{peer}-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        runs.append(run_peer(peer, minutes=args.minutes, model=model, out=out, data=args.data, peak=args.peak,
                             lr=args.peer_lr))
        print(json.dumps(runs[-1]), flush=True)
    return write_peers(runs, recipe=recipe, minutes=args.minutes, env=env, stamp=stamp, out_dir=args.out_dir)


def write_peers(runs: list[dict], *, recipe: str, minutes: float, env: dict, stamp: str, out_dir: Path) -> Path:
    out = out_dir / f"cifar10_peers-{recipe}-{minutes:g}min-{stamp}.json"
    out.write_text(json.dumps({"benchmark": "cifar10_peers", "recipe": recipe, "minutes": minutes, **env,
                               "date": stamp, "lead_over_timm_vit_points": lead_points(runs),
                               "lead_over_resnet18_points": lead_points(runs, over="resnet18"), "runs": runs},
                              indent=2) + "\n")
    return out


def describe(res: dict) -> str:
    reached = ", ".join(f"{k} {v:.1f} min" if v is not None else f"{k} -" for k, v in res["minutes_to"].items())
    tta = f" ({res['final_test_top1_tta']:.2%} with TTA)" if res["final_test_top1_tta"] is not None else ""
    teacher = (f"; teacher {res['teacher_minutes']:.1f} min at {res['teacher_test_top1']:.2%}, counted"
               if res["teacher_minutes"] is not None else "")
    return (f"final top-1 {res['final_test_top1']:.2%}{tta} at {res['run_minutes']:.2f} min "
            f"(process {res['wall_minutes']:.2f} min; {res['reference_minutes']:.2f} reference min at a bf16 peak of "
            f"{res['peak_gflops']:.0f} GFLOP/s), {res['epochs']} epochs, {res['train_images_per_sec']:.0f} "
            f"img/s, MFU {res['mfu']:.1%}{teacher}; time to {reached}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", default=["sprint", "sprint-pure", "fast", "fast-pure", "cpu-hour",
                                                   "cpu-hour-pure"])
    ap.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                    help="an extra vitlab train flag for every run, e.g. --set time-budget=3")
    ap.add_argument("--ablation", metavar="BASE", help="BASE and each lever alone over it, at --minutes each")
    ap.add_argument("--minutes", type=float, default=5.0,
                    help="the ablation's and --peers' time budget per run (default 5)")
    ap.add_argument("--peers", action="store_true",
                    help="RECIPE, timm's ViT of its width and depth and a 32 px ResNet-18, --minutes each")
    ap.add_argument("--peer-lr", type=float, help="--peers: the peers' AdamW learning rate (default 1e-3)")
    ap.add_argument("--only", action="append", default=[], help="ablation: only these levers (repeatable)")
    ap.add_argument("--base-run", type=Path, metavar="DIR",
                    help="ablation: the base is this finished run of BASE at --minutes (e.g. the vitlab run of "
                         "`BASE --peers --minutes M`), read, not trained again; with --base-peak")
    ap.add_argument("--base-peak", type=float, metavar="GFLOPS", help="--base-run: the peak measured beside it")
    ap.add_argument("--ref-minutes", type=float, metavar="N",
                    help="recipes: a time budget of N reference minutes, i.e. N x 821 / this machine's bf16 peak "
                         "(measured just before each run) wall minutes")
    ap.add_argument("--tag", default="", help="a label for the runs and rows")
    ap.add_argument("--data", help="CIFAR-10 directory (default: $VITLAB_DATA, else the cache)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--results", type=Path, default=RESULTS_MD)
    ap.add_argument("--peak", type=float, metavar="GFLOPS",
                    help="this machine's bf16 matmul peak (vitlab bench --peak), instead of measuring it per run")
    args = ap.parse_args()
    if args.peak is not None and args.peak <= 0:
        ap.error("--peak must be a positive GFLOP/s figure (vitlab bench --peak measures it)")
    if args.base_run is not None and not (args.ablation and args.base_peak and
                                          (args.base_run / "metrics.jsonl").is_file()):
        ap.error("--base-run DIR needs --ablation, --base-peak and a finished run in DIR (its metrics.jsonl)")
    extra = [part for item in args.set for part in ("--" + item.partition("=")[0], item.partition("=")[2])]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit()}
    if args.peers:
        if len(args.recipes) != 1:
            ap.error("--peers compares one recipe with the peers: name it, e.g. `sprint --peers --minutes 3`")
        out = run_peers(args.recipes[0], args, extra, env, stamp)
        runs = json.loads(out.read_text())["runs"]
        print(peers_table(runs))
        lead = lead_points(runs)
        append_rows([table_row([f"cifar10_peers {args.minutes:g} min{' ' + args.tag if args.tag else ''}",
                                time.strftime("%Y-%m-%d"), "; ".join(f"{r['name']}: `{r['command']}`" for r in runs),
                                "; ".join(f"{r['name']} {r['top1']:.2%} ({r['steps']} steps, {r['epochs']:.2f} epochs, "
                                          f"{r['minutes']:.2f} min = {r['reference_minutes']:.2f} reference min)"
                                          for r in runs) + (f"; vitlab leads the timm ViT by {lead:+.2f} points"
                                                            if lead is not None else ""),
                                f"results/{out.name}"])], args.results)
        return
    if args.ablation:
        base_flags = ["--time-budget", f"{args.minutes:g}", *extra]
        unknown = [k for k in args.only if k not in LEVERS]
        if unknown:
            ap.error(f"unknown lever(s) {', '.join(map(repr, unknown))}; choose from {', '.join(LEVERS)}")
        cases = {"(base)": []} | {k: v for k, v in LEVERS.items() if not args.only or k in args.only}
        results = {}
        if args.base_run is not None:
            del cases["(base)"]
            results["(base)"] = read_run(args.base_run, recipe=args.ablation, flags=base_flags, wall_s=None,
                                         command=f"the run in {args.base_run}", peak_gflops=args.base_peak)
        for name, flags in cases.items():
            slug = name.replace(" ", "-").replace("(", "").replace(")", "").replace(">", "")
            results[name] = run(args.ablation, base_flags + flags, run_dir=args.runs_dir / f"ablation-{stamp}-{slug}",
                                data=args.data)
            print(json.dumps({name: describe(results[name])}), flush=True)
        out = args.out_dir / f"cifar10_ablation-{args.ablation}-{args.minutes:g}min-{stamp}.json"
        out.write_text(json.dumps({"benchmark": "cifar10_ablation", "base": args.ablation, "minutes": args.minutes,
                                   **env, "runs": results}, indent=2) + "\n")
        base = results["(base)"]["final_test_top1"]
        rows = []
        for name, res in results.items():
            tta = res["final_test_top1_tta"]
            delta = "" if name == "(base)" else f"{100 * (res['final_test_top1'] - base):+.2f} pt"
            if tta is not None:
                delta += f" ({100 * (tta - base):+.2f} pt with TTA)"
            rows.append(table_row([f"ablation {args.ablation} {args.minutes:g} min{' ' + args.tag if args.tag else ''}",
                                   time.strftime("%Y-%m-%d"), f"{name}: `{res['command']}`",
                                   f"{delta or 'base'}; {describe(res)}", f"results/{out.name}"]))
        append_rows(rows, args.results)
        return
    for recipe in args.recipes:
        peak, budget = args.peak, []
        if args.ref_minutes:  # the budget follows the peak measured now
            peak = bf16_peak(args.peak)
            budget = ["--time-budget", f"{wall_minutes_for(args.ref_minutes, peak):.2f}"]
        res = run(recipe, extra + budget, run_dir=args.runs_dir / f"{recipe}-{stamp}", data=args.data, peak=peak)
        if args.ref_minutes:  # measured here rather than in run()
            res["peak_measured"] = not args.peak
        res.update(env, benchmark="cifar10_time_to_accuracy", date=stamp)
        out = args.out_dir / f"cifar10_time_to_accuracy-{recipe}-{stamp}.json"
        out.write_text(json.dumps(res, indent=2) + "\n")
        c = res["model_config"]
        setting = (f"`{res['command']}`{' ' + args.tag if args.tag else ''}: {c['name']} "
                   f"({model_kind(res)}) {res['params'] / 1e6:.2f}M params, "
                   f"{res['plan']['precision']}, {env['threads']} threads ({env['cpu']})")
        append_rows([table_row(["cifar10_time_to_accuracy", time.strftime("%Y-%m-%d"), setting, describe(res),
                                f"results/{out.name}"])], args.results)
        print(json.dumps({recipe: describe(res)}), flush=True)


if __name__ == "__main__":
    main()
