"""Interleaved timing of a training step and of an Adam epoch, and the one-step gradient check.

Timing: each variant is warmed up, then R rounds run; in round r the variants go in an order
rotated by r, each for a block of k calls sized to take about target_s, and the block's time / k
is one sample. The median of the R samples is reported, with ratios against autograd's median
from the same rounds, so slow drift of a shared machine hits every variant alike.
"""

import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor
from variants import Variant


def sync_for(device: torch.device) -> Callable[[], None]:
    """What makes a timer honest on device: cuda.synchronize there, nothing on CPU."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                     target_s: float, sync: Callable[[], None]) -> dict[str, dict]:
    """Per name: median seconds per call over `rounds` interleaved blocks, k, and every sample."""
    k = {}
    for name, fn in fns.items():
        samples = []
        for _ in range(max(warmup, 2)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - t0)
        per_call = min(samples[1:])  # the first call may still be compiling or allocating
        k[name] = max(1, min(10_000, round(target_s / max(per_call, 1e-7))))
    names = list(fns)
    samples = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one variant's block would be charged to it alone
    try:
        for r in range(rounds):
            gc.collect()
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, n = fns[name], k[name]
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - t0) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "k": k[name], "samples_s": s}
        for name, s in samples.items()
    }


def step_fns(variants: dict[str, Variant], x: Tensor, y: Tensor) -> dict[str, Callable]:
    """A training step per variant (zero grads + forward + loss + backward), no update."""
    return {name: (lambda v=v: v.step(x, y)) for name, v in variants.items()}


def adam_kwargs(impl: str) -> dict:
    """torch.optim.Adam's implementation switch: torch's default, foreach=True or fused=True."""
    return {} if impl == "default" else {impl: True}


def epoch_fns(variants: dict[str, Variant], X: Tensor, Y: Tensor, batch: int,
              lr: float = 1e-3, adam: str = "default") -> dict[str, Callable]:
    """An epoch per variant over (X, Y): a fresh torch.randperm, then Adam over every batch."""
    fns = {}
    for name, v in variants.items():
        opt = torch.optim.Adam(v.model.parameters(), lr=lr, **adam_kwargs(adam))
        fns[name] = lambda v=v, opt=opt: run_epoch(v, opt, X, Y, batch)
    return fns


def run_epoch(v: Variant, opt: torch.optim.Optimizer, X: Tensor, Y: Tensor, batch: int) -> None:
    """One pass over (X, Y) in a fresh random order; the last batch may be short."""
    perm = torch.randperm(X.shape[0], device=X.device)
    for start in range(0, X.shape[0], batch):
        idx = perm[start:start + batch]
        opt.zero_grad(set_to_none=True)
        v.fill_grads(X[idx], Y[idx])
        opt.step()


def grad_check(variants: dict[str, Variant], x: Tensor, y: Tensor) -> dict[str, dict]:
    """One step from the shared initial weights; error of loss and grads relative to autograd.

    Relative error of a tensor g against autograd's r is max|g - r| / max|r|: elementwise
    relative error is meaningless where r is ~0, and a wrong sign or mask shows up either way.
    """
    ref = variants["autograd"]
    ref_loss = ref.step(x, y).detach().float()
    ref_grads = [p.grad.detach().float() for p in ref.model.parameters()]
    out = {}
    for name, v in variants.items():
        loss = v.step(x, y).detach().float()
        grads = [p.grad.detach().float() for p in v.model.parameters()]
        errs = [_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
        out[name] = {"loss": loss.item(), "loss_rel_err": _rel(loss, ref_loss),
                     "grad_rel_err": max(errs)}
    return out


def _rel(g: Tensor, r: Tensor) -> float:
    return ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
