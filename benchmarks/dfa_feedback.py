"""How direct feedback alignment's accuracy on MNIST-1D depends on how D[i] is drawn.

    OMP_NUM_THREADS=1 python benchmarks/dfa_feedback.py [--variants he_n_i he_n_L ...]
        [--seeds 1 2 3] [--epochs 60] [--out benchmarks/results/dfa_feedback.json]
    python benchmarks/dfa_feedback.py --render benchmarks/results/dfa_feedback.json

DFA sends every hidden layer delta[i] = (delta[L] D[i]) * g'(z[i]), D[i] fixed and random of
shape (n_L, n_i). Its distribution is a free choice of the implementation. This script trains
the protocol of experiment=rules_mnist1d (MLP 40-256-256-10, ReLU, He init of W, zero b, SGD
lr 0.05, momentum 0.9, weight decay 1e-4, batch 64, 60 epochs on all 4000 training rows, last
weights tested on the 1000 test rows) with manualbp's own MLP(rule="dfa").backprop, W drawn by
the harness's initialise (manualbp.lit.module.initialise) after torch.manual_seed(seed), and
only D drawn differently per variant (after W, so W is the same for every variant of a seed).
A seed here is not the harness's run of that seed (another loop), only the same protocol:

    he_n_i      N(0, 2 / n_i)          kaiming_normal_ on (n_L, n_i): fan_in = n_i, as FA's B
                                       under init=he has fan_in = its n_in (manualbp's default)
    he_n_L      N(0, 2 / n_L)          kaiming_normal_ on D stored as (n_i, n_L): fan_in = n_L
    linear_n_i  U(+-1 / sqrt(n_i))     nn.Linear's default for a weight shaped (n_L, n_i)
    linear_n_L  U(+-1 / sqrt(n_L))     nn.Linear's default for a weight shaped (n_i, n_L)
    normal_1    N(0, 1)                torch.randn, unscaled

--variants also takes backprop and feedback_alignment: the same loop under those rules (W drawn
the same; FA's B as the harness draws it), to compare with the harness's figures.

The rows are shuffled each epoch from (seed, epoch) as the harness's EpochSampler does. Before
training (unless --no-check) the script compares one MLP.backprop step with a hand-written float64
DFA pass (delta[L] = (softmax - onehot) / m, delta[i] = (delta[L] D[i]) * relu'(z[i])) and stops
if they differ, and each run checks that training left D as it was. Each run also records, per
hidden layer, ||delta[i]|| of DFA over backprop's at init on all training rows: how large the
error D sends is against the one backprop would send. Each variant's mean and std over the
seeds are printed and, with --out, written as JSON with the load average. One torch thread: a
step of this net is a few small GEMMs.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import manualbp as mb  # noqa: E402
from manualbp.data.mnist1d import MNIST1DDataModule  # noqa: E402
from manualbp.lit.module import initialise  # noqa: E402

SIZES = [40, 256, 256, 10]


def draw(variant: str, n_L: int, n_i: int) -> torch.Tensor:
    """One D of shape (n_L, n_i) under variant, from the torch seed."""
    if variant == "he_n_i":
        return nn.init.kaiming_normal_(torch.empty(n_L, n_i), nonlinearity="relu")
    if variant == "he_n_L":
        return nn.init.kaiming_normal_(torch.empty(n_i, n_L), nonlinearity="relu").t().contiguous()
    if variant in ("linear_n_i", "linear_n_L"):
        bound = 1 / math.sqrt(n_i if variant == "linear_n_i" else n_L)
        return torch.empty(n_L, n_i).uniform_(-bound, bound)
    if variant == "normal_1":
        return torch.randn(n_L, n_i)
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


VARIANTS = ("he_n_i", "he_n_L", "linear_n_i", "linear_n_L", "normal_1")
CONTROLS = ("backprop", "feedback_alignment")  # other rules, to compare the protocol's figures
SHOWN = {"he_n_i": "N(0, 2/n_i): He, fan_in n_i (manualbp)",
         "he_n_L": "N(0, 2/n_L): He, fan_in n_L",
         "linear_n_i": "U(+-1/sqrt(n_i)): nn.Linear's, fan n_i",
         "linear_n_L": "U(+-1/sqrt(n_L)): nn.Linear's, fan n_L", "normal_1": "N(0, 1)",
         "backprop": "(backprop, for comparison)", "feedback_alignment": "(FA, for comparison)"}


def build(seed: int, variant: str) -> mb.MLP:
    torch.manual_seed(seed)
    mlp = mb.MLP(SIZES, "relu", rule=variant if variant in CONTROLS else "dfa")
    initialise(mlp.layers, "he")  # W He-normal, b zero, then D He-normal with fan_in n_i
    if variant not in ("he_n_i", *CONTROLS):
        with torch.no_grad():
            for layer in mlp.layers[:-1]:
                D = layer.feedback
                D.copy_(draw(variant, *D.shape))
    return mlp


def hand_deltas(mlp: mb.MLP, x: torch.Tensor, y: torch.Tensor, direct: bool):
    """a[0..L] and delta[1..L] of a hand-written pass: DFA's (delta[i] = (delta[L] D[i]) *
    relu'(z[i])) when direct, else backprop's (delta[i] = (delta[i+1] W[i+1]) * relu'(z[i]))."""
    Ws = [layer.weight.detach() for layer in mlp.layers]
    bs = [layer.bias.detach() for layer in mlp.layers]
    a, zs, acts = x, [], [x]
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        z = a @ W.t() + b
        zs.append(z)
        a = z if i == len(Ws) - 1 else torch.relu(z)
        acts.append(a)
    delta = (torch.softmax(zs[-1], 1) - F.one_hot(y, SIZES[-1]).to(x.dtype)) / x.shape[0]
    deltas = [delta]
    for i in range(len(Ws) - 2, -1, -1):
        down = deltas[0] @ mlp.layers[i].feedback if direct else delta @ Ws[i + 1]
        delta = down * (zs[i] > 0)
        deltas.append(delta)
    return acts, deltas[::-1]


def check(x: torch.Tensor, y: torch.Tensor) -> None:
    """One MLP.backprop under DFA against the hand-written float64 DFA pass: same gradients."""
    mlp = build(0, "he_n_i").double()
    x = x.double()
    mlp.backprop(x, y, accumulate=False)
    acts, deltas = hand_deltas(mlp, x, y, direct=True)
    for i, (layer, delta) in enumerate(zip(mlp.layers, deltas, strict=True)):
        torch.testing.assert_close(layer.weight.grad, delta.t() @ acts[i], rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0), rtol=1e-10, atol=1e-12)


def error_size(mlp: mb.MLP, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per hidden layer, ||DFA's delta[i]|| / ||backprop's delta[i]|| on (x, y) at init."""
    dfa = hand_deltas(mlp, x, y, direct=True)[1]
    bp = hand_deltas(mlp, x, y, direct=False)[1]
    return [round((d.norm() / b.norm()).item(), 3) for d, b in zip(dfa[:-1], bp[:-1],
                                                                  strict=True)]


def run(seed: int, variant: str, data, epochs: int) -> dict:
    x, y, x_test, y_test = data
    mlp = build(seed, variant)
    dfa = variant not in CONTROLS
    ratio = error_size(mlp, x, y) if dfa else None
    D0 = [layer.feedback.clone() for layer in mlp.layers[:-1]] if dfa else []
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0],
                               generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for rows in order.split(64):
            mlp.backprop(x[rows], y[rows], accumulate=False)
            opt.step()
    with torch.no_grad():
        acc = 100.0 * (mlp(x_test).argmax(1) == y_test).float().mean().item()
    for layer, D in zip(mlp.layers[:len(D0)], D0, strict=True):
        assert torch.equal(layer.feedback, D), "D changed in training: it must stay fixed"
    D_std = [round(D.std().item(), 4) for D in D0]
    return {"variant": variant, "seed": seed, "test_acc": acc, "D_std": D_std,
            "error_size_at_init": ratio,
            "wall_s": round(time.perf_counter() - start, 1), "loadavg_1min": os.getloadavg()[0]}


def _stats(accs: list[float]) -> str:
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.fmean(accs):.1f}% ({std:.1f})"


def render(data: dict) -> str:
    """README.md's Markdown table for a results file: per variant, D's std, DFA's error size
    at init against backprop's, and the test accuracy over seeds 1-3 and over all seeds."""
    seeds = sorted({r["seed"] for r in data["runs"]})
    lines = ["| D[i] drawn as | std of D (10 x 256) | DFA's error / backprop's at init, "
             f"layers 1, 2 | seeds 1-3 | seeds {seeds[0]}-{seeds[-1]} |", "|---|---|---|---|---|"]
    for variant in data["summary"]:
        runs = [r for r in data["runs"] if r["variant"] == variant]
        first = [r["test_acc"] for r in runs if r["seed"] in (1, 2, 3)]
        if variant in CONTROLS:
            size = std = ""
        else:
            std = f"{statistics.fmean(s for r in runs for s in r['D_std']):.3f}"
            size = ", ".join(f"{statistics.fmean(r['error_size_at_init'][i] for r in runs):.2f}"
                             for i in range(len(SIZES) - 2))
        lines.append(f"| {SHOWN[variant]} | {std} | {size} | {_stats(first)} | "
                     f"{_stats([r['test_acc'] for r in runs])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=VARIANTS + CONTROLS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None,
                        help="print the README table of an earlier --out file, and run nothing")
    args = parser.parse_args()
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return
    torch.set_num_threads(1)
    dm = MNIST1DDataModule(val_fraction=0)
    data = (*dm.full_train_tensors(), *dm.full_test_tensors())
    if not args.no_check:
        check(data[0][:64], data[1][:64])
        print("check: MLP.backprop under DFA equals the hand-written float64 DFA pass")
    runs, summary = [], {}
    for variant in args.variants:
        accs = []
        for seed in args.seeds:
            r = run(seed, variant, data, args.epochs)
            runs.append(r)
            accs.append(r["test_acc"])
            print(f"{variant:11s} seed {seed}: {r['test_acc']:.1f}%  D std {r['D_std']}  "
                  f"||delta|| / backprop's at init {r['error_size_at_init']}  "
                  f"{r['wall_s']} s  load {r['loadavg_1min']:.1f}", flush=True)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary[variant] = {"mean": statistics.fmean(accs), "std": std, "n": len(accs)}
        print(f"{variant:11s} mean {summary[variant]['mean']:.2f} +- {std:.2f}", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"epochs": args.epochs, "runs": runs,
                                            "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
