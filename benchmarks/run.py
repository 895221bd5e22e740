"""Benchmark manualbp's training step against autograd, torch.compile and scikit-learn.

    .venv/bin/python benchmarks/run.py                # full CPU run (~10 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick        # smoke run, under a minute
    python benchmarks/run.py --device cuda            # fp32 and bf16 (autocast) tables

Prints Markdown tables and the issue's targets (ok / MISS), and writes the raw numbers to JSON
(--out, default benchmarks/results/<device>-<date>.json) with a .md copy of what was printed.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from memory import peak_bytes, saved_bytes
from report import (
    digits_table,
    epoch_table,
    memory_table,
    native_table,
    step_table,
    targets,
    targets_table,
)
from step import adam_kwargs, epoch_fns, grad_check, step_fns, sync_for, time_interleaved
from variants import BARE, FALLBACK, NAMES, build

from manualbp import native

# (sizes, batch): tiny, digits-like, MNIST-like, and a GEMM-bound stack.
REFERENCE = [([2, 32, 32, 2], 32), ([64, 128, 10], 64), ([784, 256, 256, 10], 256),
             ([1024, 1024, 1024, 1024], 512)]
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # bf16 runs under torch.autocast
ROOT = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", metavar="SPEC",
                   help="e.g. 64,128,10 (reference batch) or 64,128,10@32; default: all four")
    p.add_argument("--activations", nargs="+", default=["relu", "tanh"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                   help="default: float32 on cpu, float32 bfloat16 on cuda")
    p.add_argument("--rounds", type=int, help="interleaved rounds per step timing (15; quick 3)")
    p.add_argument("--epoch-rounds", type=int, help="rounds for the epoch timing (5; quick 2)")
    p.add_argument("--epoch-batches", type=int, help="batches in an epoch (16; quick 2)")
    p.add_argument("--target-ms", type=float, help="length of one timed block (30; quick 10)")
    p.add_argument("--digits-repeats", type=int, help="training runs per kind (3; quick 1)")
    p.add_argument("--adam", choices=["default", "foreach", "fused"], default="fused",
                   help="torch.optim.Adam implementation for the epochs and digits runs "
                        "(fused: torch's fastest, on CPU too; default: torch's own choice)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic of the rounds for the tables and ratios (JSON keeps both); "
                   "min resists other processes' bursts on a shared machine")
    p.add_argument("--quick", action="store_true", help="few rounds, for a smoke run")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="time the torch.compile variant (default: yes; --quick: no, since "
                   "compiling eight graphs on 2 CPUs alone takes minutes)")
    p.add_argument("--no-sklearn", action="store_true", help="skip the digits comparison")
    p.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each manualbp path with the C++ core paused (the Python "
                   "Functions) and the general Functions alone (default: yes)")
    p.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each path's native nodes called directly, with none of "
                   "manualbp's Python around them (default: yes, where the C++ core is built)")
    p.add_argument("--out", type=Path, help="JSON path (a .md beside it gets the tables)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: print an earlier run's tables, rewrite its .md")
    args = p.parse_args(argv)
    defaults = {"rounds": (15, 3), "epoch_rounds": (5, 2), "epoch_batches": (16, 2),
                "target_ms": (30.0, 10.0), "digits_repeats": (3, 1), "compile": (True, False)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.digits_repeats < 0:
        p.error(f"--digits-repeats: expected a count >= 0, got {args.digits_repeats}")
    if args.digits_repeats == 0:  # no digits runs: the same as --no-sklearn
        args.no_sklearn = True
    if args.dtype is None:
        args.dtype = ["float32", "bfloat16"] if args.device == "cuda" else ["float32"]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.out is None:
        stamp = datetime.date.today().isoformat() + ("-quick" if args.quick else "")
        args.out = ROOT / "results" / f"{args.device}-{stamp}.json"
    return args


def parse_sizes(specs: list[str] | None) -> list[tuple[list[int], int]]:
    if not specs:
        return REFERENCE
    known = {tuple(s): b for s, b in REFERENCE}
    out = []
    for spec in specs:
        widths, _, batch = spec.partition("@")
        try:
            sizes = [int(w) for w in widths.split(",")]
            batch = int(batch) if batch else known.get(tuple(sizes), 64)
        except ValueError:
            raise SystemExit(
                f"--sizes: expected widths like 64,128,10[@batch], got {spec!r}") from None
        if len(sizes) < 2 or min(sizes) < 1 or batch < 1:
            raise SystemExit(f"--sizes: expected >= 2 positive widths and batch, got {spec!r}")
        out.append((sizes, batch))
    return out


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "native": native.lib() is not None,
        "loadavg_start": _load(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    try:
        import sklearn
        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    try:
        git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
        info["git"] = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def _load() -> float | None:
    """1-minute load average: above ~0.5 another process is competing for these CPUs."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def bench_config(sizes, batch, activation, dtype, device, args, names) -> dict:
    """Check, measure memory of, and time every variant on one (sizes, activation, dtype)."""
    torch._dynamo.reset()  # each config compiles afresh, never against the recompile limit
    variants = build(sizes, activation, device, DTYPES[dtype], names)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=g).to(device)
    y = torch.randint(0, sizes[-1], (batch,), generator=g).to(device)
    cfg = {"sizes": sizes, "activation": activation, "batch": batch, "dtype": dtype,
           "regime": regime(sizes),
           "per_layer_source": variants["per_layer"].source if "per_layer" in variants else None,
           "epoch_batches": args.epoch_batches, "variants": {n: {} for n in variants}}
    if "compile" in variants:
        t0 = time.perf_counter()
        variants["compile"].step(x, y)
        cfg["compile_first_step_s"] = time.perf_counter() - t0
    for name, check in grad_check(variants, x, y).items():
        cfg["variants"][name]["check"] = check
    for name, v in variants.items():
        cfg["variants"][name]["saved"] = saved_bytes(v, x, y)
        cfg["variants"][name]["peak_bytes"] = peak_bytes(v, x, y)
    sync = sync_for(device)
    target = args.target_ms / 1e3
    for name, r in time_interleaved(step_fns(variants, x, y), args.rounds, 3, target,
                                    sync).items():
        cfg["variants"][name]["step"] = r
    if args.epoch_rounds > 0:
        n = batch * args.epoch_batches
        X = torch.randn(n, sizes[0], generator=g).to(device)
        Y = torch.randint(0, sizes[-1], (n,), generator=g).to(device)
        fns = epoch_fns(variants, X, Y, batch, adam=args.adam)
        for name, r in time_interleaved(fns, args.epoch_rounds, 2, target, sync).items():
            cfg["variants"][name]["epoch"] = r
    if "mlp" in variants and native.lib() is not None and device.type == "cpu":  # no sync in C++
        cfg["floor"] = floor(variants["mlp"].model, x, y, target, args.rounds)
    cfg["stat"] = args.stat
    cfg["ratios"] = ratios(cfg["variants"], args.stat)
    return cfg


def regime(sizes: list[int]) -> str:
    """gemm: every width >= 1024; medium: some width >= 512 (MNIST-like); small otherwise."""
    if min(sizes) >= 1024:
        return "gemm"
    return "medium" if max(sizes) >= 512 else "small"


def floor(mlp, x, y, target_s: float, rounds: int) -> dict:
    """The step's kernels alone: forward, loss, delta[L], the recursion, run back to back in C++
    (no Python, no autograd, no .grad written); median over rounds of blocks of ~target_s."""
    params, acts = mlp._flat()
    lib = native.lib()
    once = min(lib.floor_seconds(x, y, params, acts, 1) for _ in range(3))
    reps = max(1, min(10_000, round(target_s / max(once, 1e-7))))
    samples = [lib.floor_seconds(x, y, params, acts, reps) for _ in range(max(rounds, 3))]
    return {"median_s": statistics.median(samples), "min_s": min(samples), "k": reps,
            "samples_s": samples}


def ratios(v: dict, stat: str) -> dict:
    """Each variant's time and memory over autograd's, times by `stat` ("median" or "min")."""
    ag, out, key = v["autograd"], {}, stat + "_s"
    for name, r in v.items():
        if name == "autograd":
            continue
        out[name] = {"step": r["step"][key] / ag["step"][key],
                     "saved_all": r["saved"]["all"] / ag["saved"]["all"],
                     "saved_new": r["saved"]["new"] / max(ag["saved"]["new"], 1)}
        if "epoch" in r:
            out[name]["epoch"] = r["epoch"][key] / ag["epoch"][key]
        if r["peak_bytes"] is not None and ag["peak_bytes"]:
            out[name]["peak"] = r["peak_bytes"] / ag["peak_bytes"]
    return out


def floor_ratio(cfg: dict, stat: str) -> float | None:
    """The floor's time over autograd's step: the best any path here could reach."""
    if "floor" not in cfg:
        return None
    return cfg["floor"][stat + "_s"] / cfg["variants"]["autograd"]["step"][stat + "_s"]


def render(results: dict, names: list[str]) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['device_name']} ({m['cpu_count']} CPUs, torch threads "
             f"{m['torch_threads']}), {m['platform']}; torch {m['torch']}, "
             f"sklearn {m.get('sklearn', '-')}; {m['date']}; git {m.get('git', '-')}; "
             f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end", ""]
    s = results["settings"]
    lines.append(f"Settings: {s['rounds']} interleaved rounds ({s['stat']}), blocks of "
                 f"~{s['target_ms']} ms; epochs: {s['epoch_rounds']} rounds of "
                 f"{s['epoch_batches']} batches, Adam ({s.get('adam', 'default')}); "
                 "ratios are variant / autograd, same run.")
    for dtype in s["dtypes"]:
        configs = [c for c in results["configs"] if c["dtype"] == dtype]
        lines += ["", f"### Training step, {m['device']} {dtype}", "", step_table(configs)]
        lines += ["", f"### Native core against its floor and its Python fallback, {m['device']} "
                  f"{dtype}", "", native_table(configs)]
        epochs = epoch_table(configs)
        if epochs:
            lines += ["", f"### Epoch with Adam, {m['device']} {dtype}", "", epochs]
        lines += ["", f"### Memory (KiB), {m['device']} {dtype}", "", memory_table(configs, names)]
    if results.get("digits"):
        d = results["digits"]
        lines += ["", f"### Digits, whole training run (CPU; {d['settings']['epochs']} epochs, "
                  f"Adam, batch {d['settings']['batch']}, [64,128,10] relu, "
                  f"{d['settings']['repeats']} seed(s))", "", digits_table(d, s["stat"])]
    lines += ["", "### Targets", ""]
    lines.append(targets_table(results["targets"]))
    return "\n".join(lines)


def _write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        stat = results["settings"]["stat"] = args.stat
        for cfg in results["configs"]:
            for timing in (t for v in cfg["variants"].values() for t in v.values()):
                if isinstance(timing, dict) and "samples_s" in timing:  # older JSON: no min_s
                    timing.setdefault("min_s", min(timing["samples_s"]))
            cfg["stat"], cfg["ratios"] = stat, ratios(cfg["variants"], stat)
            cfg["floor_x"] = floor_ratio(cfg, stat)
        for r in (results.get("digits") or {}).values():
            if isinstance(r, dict) and "samples_s" in r:
                r.setdefault("min_s", min(r["samples_s"]))
        results["targets"] = targets(results["configs"], results.get("digits"), stat)
        text = render(results, results["settings"]["variants"])
        print(text)
        args.render.with_suffix(".md").write_text(text + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n for n in NAMES if args.compile or n != "compile"]
    names += list(FALLBACK) if args.fallback else []
    names += list(BARE) if args.bare and native.lib() is not None else []
    results = {"machine": machine(device), "settings": {
        "rounds": args.rounds, "epoch_rounds": args.epoch_rounds,
        "epoch_batches": args.epoch_batches, "target_ms": args.target_ms, "adam": args.adam,
        "dtypes": args.dtype, "variants": names, "stat": args.stat, "argv": sys.argv[1:]},
        "configs": []}
    load = results["machine"]["loadavg_start"]
    if load is not None and load > 0.5:
        print(f"warning: load average {load:.1f} before the start: other processes share the "
              f"CPUs, so timings will be noisy (torch runs {torch.get_num_threads()} threads; "
              "--threads 1 suffers less from a busy machine)", file=sys.stderr)
    t_start = time.perf_counter()
    for dtype in args.dtype:
        for sizes, batch in parse_sizes(args.sizes):
            for act in args.activations:
                t0 = time.perf_counter()
                cfg = bench_config(sizes, batch, act, dtype, device, args, tuple(names))
                cfg["floor_x"] = floor_ratio(cfg, args.stat)
                results["configs"].append(cfg)
                _write_json(args.out, results)  # a run cut short keeps what it measured
                summary = "  ".join(f"{n} {r['step']:.2f}x" for n, r in cfg["ratios"].items())
                print(f"[{time.perf_counter() - t_start:6.1f}s] {dtype} {sizes} {act} b{batch}: "
                      f"{summary}  ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    if not args.no_sklearn:
        from digits import compare

        results["digits"] = compare(args.digits_repeats, adam=adam_kwargs(args.adam))
        print(f"[{time.perf_counter() - t_start:6.1f}s] digits done", file=sys.stderr)
    results["targets"] = targets(results["configs"], results.get("digits"), args.stat)
    results["settings"]["wall_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_end"] = _load()
    text = render(results, names)
    print(text)
    _write_json(args.out, results)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
