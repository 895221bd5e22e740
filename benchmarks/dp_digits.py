"""DP-SGD on scikit-learn's digits: manualbp against Opacus (ghost clipping and hooks).

    make bench-dp ARGS=--digits                  # or: python benchmarks/dp_digits.py

Same task for every kind: [64, 128, 10] relu from one seed (mb.MLP initialises as nn.Linear
does), digits split 1437 train / 360 test (stratified, seed 0), pixels / 16 (a public scale:
no statistic of the private rows), Poisson sampling at q = 256/1437 with int(1/q) = 5 steps an
epoch, 30 epochs, clip C = 1.0, noise sigma = 1.0, plain SGD lr 2.0, delta 1e-5, float32, one
torch thread. Every kind draws the same Poisson batches (one seeded generator per repeat) and
gathers them from the tensors (no DataLoader on either side). Both sides draw the noise from
torch's global generator, seeded per repeat, one N(0, 1) tensor per parameter in the same
order, so the runs are the same computation up to rounding. Opacus runs its own objects as
make_private assembles them (GradSampleModule*, DPOptimizer*, DPLossFastGradientClipping for
ghost clipping, its RDP accountant hooked on the optimizer step); the sampler follows the rule
of its UniformWithReplacementSampler. Timed: model and optimizer construction plus the
training loop. Reported: median time, mean test accuracy, and epsilon as each side's
accountant reports it.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import manualbp as mb
from manualbp.dp import Accountant, add_noise

SET = {"sizes": [64, 128, 10], "epochs": 30, "q": 256 / 1437, "max_norm": 1.0, "sigma": 1.0,
       "lr": 2.0, "delta": 1e-5}
ROOT = Path(__file__).resolve().parent


def load():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X / 16.0, y, test_size=0.2, stratify=y,
                                              random_state=0)
    t = lambda a, dt: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return (t(X_tr, torch.float32), t(y_tr, torch.int64), t(X_te, torch.float32),
            t(y_te, torch.int64))


def batches(n, seed):
    """The Poisson batches of the whole run: each row joins each with probability q."""
    g = torch.Generator().manual_seed(1000 + seed)
    steps = SET["epochs"] * int(1 / SET["q"])
    return [(torch.rand(n, generator=g) < SET["q"]).nonzero().flatten() for _ in range(steps)]


def run_manualbp(X, y, idx_list, seed, path):
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    net = mb.MLP(SET["sizes"], activation="relu")
    opt = torch.optim.SGD(net.parameters(), lr=SET["lr"])
    acc = Accountant("rdp")
    expected = SET["q"] * X.shape[0]
    params = list(net.parameters())
    for idx in idx_list:
        xb, yb = X[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        if len(idx):
            with mb.per_example(net, reduction="mean", max_norm=SET["max_norm"]):
                if path == "backprop":
                    net.backprop(xb, yb)  # mean over the batch ...
                else:
                    net.loss(xb, yb)[0].backward()
            for p in params:  # ... so .grad is the clipped sum / B: back to the sum, / q N
                p.grad.mul_(len(idx) / expected)
        add_noise(params, SET["sigma"], SET["max_norm"], "mean", expected)
        opt.step()
        acc.step(SET["sigma"], SET["q"])
    secs = time.perf_counter() - t0
    return net, secs, acc.epsilon(SET["delta"])


def run_opacus(X, y, idx_list, seed, mode):
    from opacus.accountants import RDPAccountant
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    sizes = SET["sizes"]
    net = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))
    expected = int(SET["q"] * X.shape[0])
    kw = dict(noise_multiplier=SET["sigma"], max_grad_norm=SET["max_norm"],
              expected_batch_size=expected, loss_reduction="mean")
    if mode == "ghost":
        model = GradSampleModuleFastGradientClipping(net, max_grad_norm=SET["max_norm"],
                                                     use_ghost_clipping=True,
                                                     loss_reduction="mean")
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(),
                                                              lr=SET["lr"]), **kw)
        crit = DPLossFastGradientClipping(model, opt, nn.CrossEntropyLoss(), "mean")
    else:
        model = GradSampleModule(net, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=SET["lr"]), **kw)
        crit = nn.CrossEntropyLoss()
    accountant = RDPAccountant()
    opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=SET["q"]))
    for idx in idx_list:
        opt.zero_grad(set_to_none=True)
        if len(idx):
            crit(model(X[idx]), y[idx]).backward()
        opt.step()
    secs = time.perf_counter() - t0
    return net, secs, accountant.get_epsilon(delta=SET["delta"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(1)
    # imported before any timing, so that no kind pays for them
    import opacus.accountants  # noqa: F401
    import opacus.grad_sample  # noqa: F401
    import opacus.optimizers  # noqa: F401
    import opacus.utils.fast_gradient_clipping_utils  # noqa: F401

    X, y, X_te, y_te = load()
    kinds = ("manualbp_backprop", "manualbp_node", "opacus_ghost", "opacus_hooks")
    res = {k: {"secs": [], "acc": [], "eps": []} for k in kinds}
    load_start = os.getloadavg()[0]
    warm = batches(X.shape[0], -1)[:10]  # first-call costs (lazy inits) outside the timing
    for kind in kinds:
        run = run_manualbp if kind.startswith("manualbp") else run_opacus
        run(X, y, warm, 0, kind.split("_")[1])
    for r in range(args.repeats):
        idx_list = batches(X.shape[0], r)
        for kind in kinds[r % 4:] + kinds[:r % 4]:  # rotated order
            if kind.startswith("manualbp"):
                net, secs, eps = run_manualbp(X, y, idx_list, r, kind.split("_")[1])
            else:
                net, secs, eps = run_opacus(X, y, idx_list, r, kind.split("_")[1])
            with torch.no_grad():
                acc = 100.0 * float((net(X_te).argmax(1) == y_te).float().mean())
            res[kind]["secs"].append(secs)
            res[kind]["acc"].append(acc)
            res[kind]["eps"].append(eps)
        print(f"repeat {r} done", file=sys.stderr)
    out = {"settings": {**SET, "n_train": X.shape[0], "n_test": X_te.shape[0],
                        "repeats": args.repeats, "torch": torch.__version__, "threads": 1},
           "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]}
    lines = ["| kind | median s | mean test acc % | epsilon |", "|---|---|---|---|"]
    for kind in kinds:
        v = res[kind]
        out[kind] = {**v, "median_s": statistics.median(v["secs"]),
                     "acc_mean": statistics.fmean(v["acc"])}
        lines.append(f"| {kind} | {out[kind]['median_s']:.3f} | {out[kind]['acc_mean']:.2f} | "
                     f"{v['eps'][0]:.4f} |")
    text = "\n".join(lines)
    path = args.out or ROOT / "results" / "dp-digits-cpu-1thread.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    path.with_suffix(".md").write_text(
        f"# DP-SGD on digits ({args.repeats} repeats, load average {load_start:.2f} -> "
        f"{out['loadavg_end']:.2f})\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
