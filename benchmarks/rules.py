"""A learning rule's training step against backprop's, on the same path, side by side.

    python benchmarks/rules.py [--rounds 15] [--sgd fused] [--out benchmarks/results/rules-cpu-DATE]

A step is a whole SGD training step (momentum 0.9, weight decay 1e-4): forward, delta[L],
the recursion, every gradient, optimizer.step(); "pass only" leaves the optimizer out (for
Kolen-Pollack the optimizer also steps B, as many numbers as W: the rule's own update).
Paths: MLP.backprop (no graph), the MLP node (mlp.loss(x, y)[0].backward()) and per-layer
mb.Linear layers in an nn.Sequential (no DFA there). Timing is step.py's: rounds interleave
every variant in rotated order, and each rule's ratio is its median over backprop's median on
the same path in the same rounds. The load average is recorded before and after: the machine
may be shared.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import time_interleaved  # noqa: E402

import manualbp as mb  # noqa: E402

RULES = ["backprop", "feedback_alignment", "sign_symmetry", "kolen_pollack",
         "direct_feedback_alignment"]
SHAPES = {"mnist1d 40-256-256-10, batch 64": ([40, 256, 256, 10], 64),
          "wide 784-1024-1024-10, batch 256": ([784, 1024, 1024, 10], 256)}


def make_step(path: str, rule: str, sizes, x, y, update: bool = True, step_B: bool = True,
              sgd: str = "foreach"):
    """One training step's closure; step_B=False leaves Kolen-Pollack's B out of the optimizer
    (its .grad is still formed), to see what B's own update costs. sgd: torch.optim.SGD's
    implementation, "foreach" (torch's default on CPU) or "fused" (one kernel per tensor)."""
    torch.manual_seed(0)
    if path == "per_layer":
        L = len(sizes) - 1
        model = nn.Sequential(*[
            mb.Linear(sizes[i], sizes[i + 1], activation="relu" if i < L - 1 else "identity",
                      rule=rule)
            for i in range(L)])
    else:
        model = mb.MLP(sizes, rule=rule)
    named = list(model.named_parameters())
    opt = torch.optim.SGD([p for n, p in named if step_B or not n.endswith("feedback")], lr=0.01,
                          momentum=0.9, weight_decay=1e-4, **{sgd: True})
    left_out = [p for n, p in named if not step_B and n.endswith("feedback")]

    def step():
        if path == "backprop()":
            model.backprop(x, y, accumulate=False)
        else:
            opt.zero_grad()
            for B in left_out:  # cleared as the optimizer clears the rest (no accumulation)
                B.grad = None
            loss = (model.loss(x, y)[0] if path == "node"
                    else mb.softmax_cross_entropy(model(x), y))
            loss.backward()
        if update:
            opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--target-s", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads than "
                        "free cores make every small GEMM wait for a descheduled thread)")
    parser.add_argument("--sgd", choices=["foreach", "fused"], default="foreach",
                        help="torch.optim.SGD's implementation (fused: one kernel per tensor, "
                        "so the optimizer's share of the step, B's update included, shrinks)")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--kp-update", action="store_true",
                        help="instead: Kolen-Pollack's step with and without the optimizer "
                        "stepping B, against backprop's, per path (B's update's share)")
    parser.add_argument("--akrout-epoch", action="store_true",
                        help="instead: seconds per epoch of Akrout et al.'s 784-500-10 sigmoid "
                        "net on 60000 random MNIST-shaped rows, batch 64, per rule")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.akrout_epoch:
        return akrout_epoch()
    if args.kp_update:
        return kp_update(args)
    load_before = os.getloadavg()
    results = {}
    for shape, (sizes, batch) in SHAPES.items():
        x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
        for path in ["backprop()", "node", "per_layer"]:
            rules = [r for r in RULES if path != "per_layer" or r != "direct_feedback_alignment"]
            for update in (True, False):
                fns = {rule: make_step(path, rule, sizes, x, y, update, sgd=args.sgd)
                       for rule in rules}
                timed = time_interleaved(fns, args.rounds, warmup=3, target_s=args.target_s,
                                         sync=lambda: None)
                base = timed["backprop"]["median_s"]
                what = "step" if update else "pass only (no optimizer.step)"
                results[f"{shape}, {path}, {what}"] = {
                    rule: {"median_ms": 1e3 * t["median_s"], "ratio": t["median_s"] / base}
                    for rule, t in timed.items()}
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "rounds": args.rounds, "sgd": args.sgd,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    table = render(results, meta)
    print(table)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results},
                                                       indent=1) + "\n")
        Path(args.out + ".md").write_text(table + "\n")


def kp_update(args) -> None:
    """Kolen-Pollack's step, and the same with B left out of the optimizer, over backprop's."""
    load_before = os.getloadavg()
    lines = []
    for shape, (sizes, batch) in SHAPES.items():
        x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
        for path in ["backprop()", "node", "per_layer"]:
            fns = {"backprop": make_step(path, "backprop", sizes, x, y, sgd=args.sgd),
                   "kp": make_step(path, "kolen_pollack", sizes, x, y, sgd=args.sgd),
                   "kp, B not stepped": make_step(path, "kolen_pollack", sizes, x, y,
                                                  step_B=False, sgd=args.sgd)}
            t = {k: v["median_s"] for k, v in time_interleaved(
                fns, args.rounds, warmup=3, target_s=args.target_s, sync=lambda: None).items()}
            share = (t["kp"] - t["kp, B not stepped"]) / t["kp"]
            lines.append(f"| {shape}, {path} ({1e3 * t['backprop']:.2f} ms) | "
                         f"{t['kp'] / t['backprop']:.3f} | "
                         f"{t['kp, B not stepped'] / t['backprop']:.3f} | {100 * share:.0f}% |")
    load_after = os.getloadavg()
    table = "\n".join([
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} "
        f"interleaved rounds, load average {load_before[0]:.1f} -> {load_after[0]:.1f}; "
        "Kolen-Pollack's SGD step time over backprop's on the same path (backprop's median ms "
        "in brackets)", "",
        "| shape, path | kolen_pollack | B not stepped by the optimizer | B's update, share of "
        "the step |", "|---|---|---|---|", *lines])
    print(table)
    if args.out:
        Path(args.out + ".md").write_text(table + "\n")


def akrout_epoch() -> None:
    """One epoch per rule of MLP.backprop + SGD; the data are random (the timing is not)."""
    X, Y = torch.randn(60000, 784), torch.randint(0, 10, (60000,))
    for rule in ["backprop", "feedback_alignment", "kolen_pollack"]:
        torch.manual_seed(0)
        mlp = mb.MLP([784, 500, 10], activation="sigmoid", rule=rule)
        opt = torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        start = time.perf_counter()
        for idx in torch.randperm(60000).split(64):
            mlp.backprop(X[idx], Y[idx], accumulate=False)
            opt.step()
        print(f"{rule}: {time.perf_counter() - start:.1f} s/epoch, {torch.get_num_threads()} "
              f"thread(s), load average {os.getloadavg()[0]:.1f}")


def render(results: dict, meta: dict) -> str:
    lines = [f"torch {meta['torch']}, {meta['threads']} threads, {meta['rounds']} interleaved "
             f"rounds, SGD ({meta.get('sgd', 'foreach')}), load average "
             f"{meta['loadavg_before'][0]:.1f} -> "
             f"{meta['loadavg_after'][0]:.1f}; step time ratio to backprop on the same path "
             "(backprop's median ms in brackets)", "",
             "| shape, path | " + " | ".join(RULES[1:]) + " |", "|---" * len(RULES) + "|"]
    for key, row in results.items():
        cells = [f"{row[r]['ratio']:.3f}" if r in row else "n/a" for r in RULES[1:]]
        lines.append(f"| {key} ({row['backprop']['median_ms']:.2f} ms) | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
