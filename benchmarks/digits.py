"""A whole training run on scikit-learn's bundled digits: torch variants vs MLPClassifier.

Same task for everyone: [64, 128, 10], relu, Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8), no
weight decay (sklearn alpha=0), batch 64 with the short last batch kept, a fresh shuffle each
epoch, 60 epochs run to the end (sklearn tol=0, n_iter_no_change past max_iter, no early
stopping), float32 inputs standardised with the training split's mean and std. Timed: building
the model and optimizer plus the training loop (torch), MLPClassifier.fit (sklearn). The torch
side shuffles with one torch.randperm gather per epoch and slices batches from it, so no
DataLoader is in what is measured. Every torch kind zeroes gradients before each step except
backprop, whose MLP.backprop(accumulate=False) replaces them instead.
Runs on the CPU, where scikit-learn runs.
"""

import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import manualbp as mb
from manualbp import native

SIZES = [64, 128, 10]
SETTINGS = {"epochs": 60, "batch": 64, "lr": 1e-3, "activation": "relu", "test_size": 0.25}


def load(seed: int = 0):
    """Standardised float32 (X_train, X_test, y_train, y_test), a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=SETTINGS["test_size"], stratify=y, random_state=seed
    )
    scaler = StandardScaler().fit(X_tr)
    return (scaler.transform(X_tr).astype(np.float32), scaler.transform(X_te).astype(np.float32),
            y_tr, y_te)


def _torch_net(kind: str) -> tuple[nn.Module, Callable]:
    """The network and its backward(net, x, y) (forward, loss, gradients into .grad), as each
    variant trains in the step benchmark."""
    act = SETTINGS["activation"]
    if kind in ("natural", "natural_py"):  # the path users write first
        return mb.MLP(SIZES, act), lambda net, x, y: mb.softmax_cross_entropy(net(x), y).backward()
    if kind == "mlp":  # everything by hand, the softmax cross-entropy folded in
        return mb.MLP(SIZES, act), lambda net, x, y: net.loss(x, y)[0].backward()
    if kind == "backprop":  # the same pass with no autograd at all; it replaces .grad
        return mb.MLP(SIZES, act), lambda net, x, y: net.backprop(x, y, accumulate=False)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if kind == "per_layer":  # convert() of the autograd model; the training code is unchanged
        net = mb.convert(net)
    return net, lambda net, x, y: F.cross_entropy(net(x), y).backward()


def train_torch(kind: str, X_tr: torch.Tensor, y_tr: torch.Tensor, seed: int,
                adam: dict | None = None):
    """Train one torch variant; returns (model, seconds)."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    net, backward = _torch_net(kind)
    opt = torch.optim.Adam(net.parameters(), lr=SETTINGS["lr"], betas=(0.9, 0.999), eps=1e-8,
                           **(adam or {}))
    n, batch = X_tr.shape[0], SETTINGS["batch"]
    zero = kind != "backprop"  # backprop(accumulate=False) overwrites .grad itself
    for _ in range(SETTINGS["epochs"]):
        perm = torch.randperm(n)
        X, y = X_tr[perm], y_tr[perm]  # one gather per epoch; each batch is then a view
        for start in range(0, n, batch):
            if zero:
                opt.zero_grad(set_to_none=True)
            backward(net, X[start:start + batch], y[start:start + batch])
            opt.step()
    return net, time.perf_counter() - t0


def train_sklearn(X_tr: np.ndarray, y_tr: np.ndarray, seed: int):
    """Fit MLPClassifier with the matched settings; returns (classifier, seconds)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(
        hidden_layer_sizes=tuple(SIZES[1:-1]), activation=SETTINGS["activation"], solver="adam",
        alpha=0.0, batch_size=SETTINGS["batch"], learning_rate_init=SETTINGS["lr"],
        max_iter=SETTINGS["epochs"], shuffle=True, tol=0.0,
        n_iter_no_change=SETTINGS["epochs"] + 1, early_stopping=False,
        beta_1=0.9, beta_2=0.999, epsilon=1e-8, random_state=seed,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # "max_iter reached": intended
        clf.fit(X_tr, y_tr)
    return clf, time.perf_counter() - t0


def compare(repeats: int,
            kinds: tuple[str, ...] = ("autograd", "per_layer", "natural", "natural_py", "mlp",
                                      "backprop", "sklearn"),
            adam: dict | None = None):
    """Each repeat trains every kind once (seed = repeat, order rotated); medians and means.

    adam: extra torch.optim.Adam kwargs (foreach=True / fused=True) for the torch kinds.
    """
    X_tr, X_te, y_tr, y_te = load()
    tX_tr, ty_tr = torch.from_numpy(X_tr), torch.from_numpy(y_tr).long()
    tX_te = torch.from_numpy(X_te)
    times = {k: [] for k in kinds}
    accs = {k: [] for k in kinds}
    extra = {}
    for r in range(repeats):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            if kind == "sklearn":
                clf, secs = train_sklearn(X_tr, y_tr, seed=r)
                acc = float((clf.predict(X_te) == y_te).mean())
                extra = {"sklearn_n_iter": clf.n_iter_, "sklearn_dtype": str(clf.coefs_[0].dtype)}
            elif kind.endswith("_py"):  # the C++ core paused: the Python Functions
                with native.paused():
                    net, secs = train_torch(kind, tX_tr, ty_tr, seed=r, adam=adam)
            else:
                net, secs = train_torch(kind, tX_tr, ty_tr, seed=r, adam=adam)
                with torch.no_grad():
                    acc = float((net(tX_te).argmax(1).numpy() == y_te).mean())
            times[kind].append(secs)
            accs[kind].append(100.0 * acc)
    result = {"settings": {**SETTINGS, "sizes": SIZES, "repeats": repeats, "adam": adam or {},
                           "n_train": len(y_tr), "n_test": len(y_te)}, **extra}
    for kind in kinds:
        result[kind] = {"median_s": statistics.median(times[kind]), "min_s": min(times[kind]),
                        "samples_s": times[kind],
                        "test_acc_mean": statistics.fmean(accs[kind]), "test_acc": accs[kind]}
    return result


PARTS = ("shuffle", "slice", "zero_grad", "forward+backward", "adam", "loop")


def breakdown(repeats: int = 3, kinds: tuple[str, ...] = ("autograd", "natural", "mlp", "backprop"),
              adam: dict | None = None) -> dict:
    """Where a training run's time goes: train_torch's loop, each part timed on its own.

    Per kind, the median over repeats (seed = repeat, kinds rotated) of each part's seconds for
    the whole run: the epoch's shuffle (randperm and gather), the batch slices, zero_grad, the
    forward + backward, the optimizer step, and the loop (the rest: the timers themselves and
    Python's loop). Build time is left out. Not the timed protocol of compare(), which has no
    timers inside the loop.
    """
    X_tr, _, y_tr, _ = load()
    tX, ty = torch.from_numpy(X_tr), torch.from_numpy(y_tr).long()
    n, batch = tX.shape[0], SETTINGS["batch"]
    samples = {k: {p: [] for p in PARTS} for k in kinds}
    clock = time.perf_counter
    for r in range(repeats):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            torch.manual_seed(r)
            net, backward = _torch_net(kind)
            opt = torch.optim.Adam(net.parameters(), lr=SETTINGS["lr"], betas=(0.9, 0.999),
                                   eps=1e-8, **(adam or {}))
            zero = kind != "backprop"
            t = dict.fromkeys(PARTS, 0.0)
            start_run = clock()
            for _ in range(SETTINGS["epochs"]):
                t0 = clock()
                perm = torch.randperm(n)
                X, y = tX[perm], ty[perm]
                t["shuffle"] += clock() - t0
                for start in range(0, n, batch):
                    t1 = clock()
                    xb, yb = X[start:start + batch], y[start:start + batch]
                    t2 = clock()
                    if zero:
                        opt.zero_grad(set_to_none=True)
                    t3 = clock()
                    backward(net, xb, yb)
                    t4 = clock()
                    opt.step()
                    t5 = clock()
                    t["slice"] += t2 - t1
                    t["zero_grad"] += t3 - t2
                    t["forward+backward"] += t4 - t3
                    t["adam"] += t5 - t4
            total = clock() - start_run
            t["loop"] = total - sum(t[p] for p in PARTS if p != "loop")
            for p in PARTS:
                samples[kind][p].append(t[p])
    steps = SETTINGS["epochs"] * -(-n // batch)
    return {"steps": steps, **{k: {p: statistics.median(v) for p, v in parts.items()}
                               for k, parts in samples.items()}}


def adam_cost(rounds: int = 11, steps: int = 200, adam: dict | None = None) -> dict:
    """The optimizer step's own cost, hot and as a training run meets it: median microseconds of
    one torch.optim.Adam step on the digits model's parameters, (a) called again and again on the
    same gradients, (b) after fresh gradient tensors are put in .grad, (c) right after a forward
    + backward of each kind (what train_torch's loop does), interleaved over rounds.

    Every kind pays (c) whatever its backward costs; the gap (c) - (a) is the backward leaving
    the step's code and data cold, and it grows with what the backward ran.
    """
    X_tr, _, y_tr, _ = load()
    x = torch.from_numpy(X_tr[:SETTINGS["batch"]])
    y = torch.from_numpy(y_tr[:SETTINGS["batch"]]).long()
    cases = {}
    for kind in ("autograd", "natural", "backprop"):
        torch.manual_seed(0)
        net, backward = _torch_net(kind)
        params = list(net.parameters())
        opt = torch.optim.Adam(params, lr=SETTINGS["lr"], **(adam or {}))
        backward(net, x, y)
        grads = [p.grad.clone() for p in params]

        def fresh(params=params, grads=grads):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()

        def after(net=net, backward=backward, params=params):
            for p in params:
                p.grad = None
            backward(net, x, y)

        if kind == "autograd":
            cases["hot"] = (opt, lambda: None)
            cases["fresh grads"] = (opt, fresh)
        cases[f"after {kind}"] = (opt, after)
    clock = time.perf_counter
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (opt, before) in cases.items():
            total = 0.0
            for _ in range(steps):
                before()
                t0 = clock()
                opt.step()
                total += clock() - t0
            samples[name].append(1e6 * total / steps)
    return {name: statistics.median(v) for name, v in samples.items()}
