"""Per-example gradient norms and DP-SGD clipped gradients: manualbp against the known ways.

    make bench-dp                                      # installs Opacus + BackPACK, then runs
    python benchmarks/per_example.py [--rounds 9] [--quick]

Every figure is a ratio to one autograd forward + backward of the same model and batch, timed
side by side in one run (interleaved rounds, medians; see step.time_interleaved), one torch
thread, float32, relu. Variants:

  norms/*   each example's gradient norm;  clip/*   the DP-SGD clipped gradient (C = 1, no noise)
  per_layer   manualbp.convert(model) inside mb.per_example, loss.backward()
  mlp         manualbp.MLP.loss (the MLP node) inside mb.per_example, loss.backward()
  backprop    manualbp.MLP.backprop inside mb.per_example (no autograd)
  opacus_ghost  Opacus ghost clipping (GradSampleModuleFastGradientClipping: two backwards)
  opacus_hooks  Opacus GradSampleModule hooks: per-sample gradients, then the clip
  backpack    BackPACK BatchL2Grad (norms only; needs nn.Sequential-shaped models)
  vmap        torch.func vmap(grad) per-sample gradients, then norms / the clip

Also: extra peak memory of the clipped step over autograd's, against the issue's bound
B * sum of output widths floats, and the largest error of each variant's norms and clipped
gradient relative to vmap's.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from memory import _cpu_peak
from step import time_interleaved
from torch import nn
from torch.func import functional_call, grad, vmap

import manualbp as mb

MLPS = [([784, 256, 256, 10], 128), ([784, 512, 512, 512, 10], 256), ([40, 256, 256, 10], 100)]
TRANSFORMER = {"batch": 32, "T": 16, "d": 64, "heads": 4, "classes": 10}
C = 1.0
ROOT = Path(__file__).resolve().parent


class Block(nn.Module):
    """A small pre-norm transformer block on (B, T, d), mean-pooled to class logits. Every
    parameter is an nn.Linear's (LayerNorm without affine), so a clipped gradient covers all."""

    def __init__(self, d, heads, classes):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        B, T, d = x.shape
        h = F.layer_norm(x, (d,))
        q, k, v = (f(h).reshape(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k,
                                                                                 self.v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.o(att)
        x = x + self.mlp(F.layer_norm(x, (d,)))
        return self.head(x.mean(1))


def autograd_mlp(sizes):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def copy_of(net):
    import copy

    return copy.deepcopy(net)


def vmap_grads(net, x, y):
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(ps, x_n, y_n):
        return F.cross_entropy(functional_call(net, ps, (x_n[None],)), y_n[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def vmap_norms(g):
    return torch.stack([v.flatten(1).square().sum(1) for v in g.values()]).sum(0).sqrt()


def vmap_clipped(g):
    norms = vmap_norms(g)
    c = (C / (norms + 1e-6)).clamp(max=1)
    return [(c.reshape(-1, *[1] * (v.dim() - 1)) * v).mean(0) for v in g.values()]


def variants(net, x, y, mlp_sizes=None):
    """name -> (step function, reader of (norms, {param name: clipped grad}) after a step)."""
    B = x.shape[0]
    out = {}
    ref = copy_of(net)

    def autograd_step():
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
    out["autograd"] = (autograd_step, None)

    conv = mb.convert(copy_of(net))
    models = {"per_layer": conv}
    if mlp_sizes is not None:
        mlp = mb.MLP(mlp_sizes, activation="relu")
        mlp.load_state_dict({f"layers.{i // 2}.{k}": v for i, (k, v) in enumerate(
            (name.split(".")[-1], p) for name, p in net.named_parameters())})
        models["mlp"] = models["backprop"] = mlp
    for kind in ("norms", "clip"):
        max_norm = C if kind == "clip" else None
        for path, model in models.items():
            holder = {}

            def step(model=model, path=path, max_norm=max_norm, holder=holder):
                model.zero_grad(set_to_none=True)
                with mb.per_example(model, max_norm=max_norm) as pe:
                    if path == "per_layer":
                        F.cross_entropy(model(x), y).backward()
                    elif path == "mlp":
                        model.loss(x, y)[0].backward()
                    else:
                        model.backprop(x, y)
                holder["pe"] = pe

            def read(model=model, holder=holder):
                return holder["pe"].norms, [p.grad for p in model.parameters()]
            out[f"{kind}/{path}"] = (step, read)
    out.update(_peers(net, x, y, B))
    return out


def _peers(net, x, y, B):
    out = {}
    vm = copy_of(net)
    holder = {}

    def vmap_norm_step():
        holder["g"] = vmap_grads(vm, x, y)
        holder["norms"] = vmap_norms(holder["g"])

    def vmap_clip_step():
        holder["g"] = vmap_grads(vm, x, y)
        holder["clipped"] = vmap_clipped(holder["g"])
    out["norms/vmap"] = (vmap_norm_step, lambda: (holder["norms"], None))
    out["clip/vmap"] = (vmap_clip_step, lambda: (vmap_norms(holder["g"]), holder["clipped"]))
    try:
        out.update(_opacus(net, x, y, B))
    except ImportError as error:
        print(f"opacus: not installed ({error}); make bench-dp installs it", file=sys.stderr)
    try:
        out.update(_backpack(net, x, y))
    except ImportError as error:
        print(f"backpack: not installed ({error}); make bench-dp installs it", file=sys.stderr)
    return out


def _opacus(net, x, y, B):
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    out = {}
    ghost = GradSampleModuleFastGradientClipping(copy_of(net), max_grad_norm=C,
                                                 use_ghost_clipping=True, loss_reduction="mean")
    g_opt = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=0.1),
                                            noise_multiplier=0.0, max_grad_norm=C,
                                            expected_batch_size=B, loss_reduction="mean")
    crit = DPLossFastGradientClipping(ghost, g_opt, nn.CrossEntropyLoss(), loss_reduction="mean")

    def ghost_step():
        g_opt.zero_grad(set_to_none=True)
        crit(ghost(x), y).backward()  # both backward passes; .grad = sum_n c_n g_n

    def ghost_read():
        return ghost.get_norm_sample(), [p.grad / B for p in ghost.parameters()]
    out["clip/opacus_ghost"] = (ghost_step, ghost_read)

    hooks = GradSampleModule(copy_of(net), loss_reduction="mean")
    h_opt = DPOptimizer(torch.optim.SGD(hooks.parameters(), lr=0.1), noise_multiplier=0.0,
                        max_grad_norm=C, expected_batch_size=B, loss_reduction="mean")
    holder = {}

    def hooks_norm_step():
        h_opt.zero_grad(set_to_none=True)
        F.cross_entropy(hooks(x), y).backward()
        holder["norms"] = torch.stack([p.grad_sample.flatten(1).square().sum(1)
                                       for p in hooks.parameters()]).sum(0).sqrt()

    def hooks_clip_step():
        h_opt.zero_grad(set_to_none=True)
        F.cross_entropy(hooks(x), y).backward()
        h_opt.clip_and_accumulate()  # per-sample norms, clip, sum: Opacus's own clip

    def hooks_read():
        return None, [p.summed_grad / B for p in hooks.parameters()]
    out["norms/opacus_hooks"] = (hooks_norm_step, lambda: (holder["norms"], None))
    out["clip/opacus_hooks"] = (hooks_clip_step, hooks_read)
    return out


def _backpack(net, x, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    if not isinstance(net, nn.Sequential):
        print("backpack: n/a for the transformer block (BackPACK's propagated quantities need "
              "an nn.Sequential-shaped model)", file=sys.stderr)
        return {}
    model, loss_fn = extend(copy_of(net)), extend(nn.CrossEntropyLoss())
    holder = {}

    def step():
        model.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            loss_fn(model(x), y).backward()
        # batch_l2 of a mean loss is ||g_n / B||^2: rescaled to each example's own gradient
        holder["norms"] = torch.stack([p.batch_l2 for p in model.parameters()]).sum(0).sqrt() \
            * x.shape[0]
    return {"norms/backpack": (step, lambda: (holder["norms"], None))}


def errors(fns, names):
    """Largest error of each variant's norms and clipped grads against vmap's, relative to the
    largest reference value."""
    fns["clip/vmap"][0]()
    ref_norms, ref_clip = fns["clip/vmap"][1]()
    out = {}
    for name in names:
        step, read = fns[name]
        if read is None or name.endswith("vmap"):
            continue
        step()
        norms, clipped = read()
        err = {}
        if norms is not None:
            err["norms"] = float((norms - ref_norms).abs().max() / ref_norms.abs().max())
        if name.startswith("clip/") and clipped is not None:
            # against the largest reference entry of all parameters: one may be exactly 0 in
            # exact arithmetic (the key bias of attention: softmax ignores it) and rounding
            scale = max(float(r.abs().max()) for r in ref_clip)
            err["clip"] = max(float((g - r).abs().max()) / scale
                              for g, r in zip(clipped, ref_clip, strict=True))
        out[name] = err
    return out


def memory(fns, B, widths):
    """Extra peak bytes of each manualbp clipped step over the autograd step, and the bound."""
    base = _cpu_peak(fns["autograd"][0])
    bound = B * sum(widths) * 4
    out = {"bound_bytes": bound, "autograd_peak_bytes": base}
    for name in fns:
        if name.startswith("clip/") and name.split("/")[1] in ("per_layer", "mlp", "backprop"):
            peak = _cpu_peak(fns[name][0])
            out[name] = {"peak_bytes": peak, "extra_bytes": None if peak is None or base is None
                         else peak - base}
    return out


def run_config(label, net, x, y, mlp_sizes, args):
    fns = variants(net, x, y, mlp_sizes)
    names = [n for n in fns if n == "autograd" or not args.only
             or any(part in n for part in args.only.split(","))]
    timing = time_interleaved({n: fns[n][0] for n in names}, rounds=args.rounds, warmup=3,
                              target_s=args.target_ms / 1000, sync=lambda: None)
    base = timing["autograd"]["median_s"]
    result = {"label": label, "batch": x.shape[0],
              "ratio": {n: timing[n]["median_s"] / base for n in names},
              "ratio_of_mins": {n: timing[n]["min_s"] / timing["autograd"]["min_s"]
                                for n in names},
              "median_ms": {n: 1000 * timing[n]["median_s"] for n in names},
              "errors": errors(fns, names)}
    if mlp_sizes is not None:
        result["memory"] = memory(fns, x.shape[0], mlp_sizes[1:])
    return result


def render(results):
    m = results["machine"]
    lines = [f"# Per-example norms and clipped gradients, {m['date']}", "",
             f"{m['cpu']}, torch {m['torch']}, {m['threads']} thread(s), float32, relu; "
             f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end; "
             f"{results['rounds']} interleaved rounds, medians"
             + (f"; only the variants matching {results['only']}" if results.get("only") else "")
             + ".", "",
             "Ratio to one autograd forward + backward of the same model and batch:", ""]
    labels = [r["label"] for r in results["configs"]]
    names = []
    for r in results["configs"]:
        names += [n for n in r["ratio"] if n not in names and n != "autograd"]
    lines += ["| variant | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for n in names:
        cells = [f"{r['ratio'][n]:.2f}x" if n in r["ratio"] else "n/a" for r in results["configs"]]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "autograd forward + backward, ms: " + ", ".join(
        f"{r['label']} {r['median_ms']['autograd']:.2f}" for r in results["configs"]), ""]
    lines += ["Largest error relative to vmap(grad) (float32): norms / clipped gradient", ""]
    for r in results["configs"]:
        errs = ", ".join(f"{n} {e.get('norms', float('nan')):.1e}/{e.get('clip', float('nan')):.1e}"
                         for n, e in r["errors"].items())
        lines.append(f"- {r['label']}: {errs}")
    lines += ["", "Extra peak memory of the clipped step over autograd's (bound: B * sum of "
              "output widths floats):", ""]
    for r in results["configs"]:
        mem = r.get("memory")
        if not mem:
            continue
        parts = [f"{n} {v['extra_bytes'] / 1024:.0f} KiB" for n, v in mem.items()
                 if isinstance(v, dict) and v["extra_bytes"] is not None]
        lines.append(f"- {r['label']}: bound {mem['bound_bytes'] / 1024:.0f} KiB; "
                     + ", ".join(parts))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--target-ms", type=float, default=40.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 rounds, the first MLP only")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: 2 rounds on a tiny MLP and a tiny block (tests use it)")
    p.add_argument("--only", default="",
                   help="time only the variants whose names hold one of these comma-separated "
                        "parts (and autograd), e.g. per_layer,mlp,backprop for manualbp's")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.target_ms = 3, 10.0
    mlps, block = MLPS, TRANSFORMER
    if args.tiny:
        args.rounds, args.target_ms = 2, 2.0
        mlps = [([20, 16, 16, 5], 8)]
        block = {"batch": 4, "T": 4, "d": 16, "heads": 2, "classes": 3}
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, BackPACK
    stamp = datetime.date.today().isoformat()
    out = args.out or ROOT / "results" / f"per-example-cpu-{args.threads}thread-{stamp}.json"
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results = {"machine": {"date": now,
                           "cpu": cpu, "torch": torch.__version__, "threads": args.threads,
                           "loadavg_start": os.getloadavg()[0]},
               "rounds": args.rounds, "configs": []}
    results["only"] = args.only or None
    configs = mlps[:1] if args.quick else mlps
    for sizes, B in configs:
        torch.manual_seed(0)
        net = autograd_mlp(sizes)
        x, y = torch.randn(B, sizes[0]), torch.randint(0, sizes[-1], (B,))
        label = "-".join(map(str, sizes)) + f" b{B}"
        results["configs"].append(run_config(label, net, x, y, sizes, args))
        print(label, "done", file=sys.stderr)
    if not args.quick:
        t = block
        torch.manual_seed(0)
        net = Block(t["d"], t["heads"], t["classes"])
        x = torch.randn(t["batch"], t["T"], t["d"])
        y = torch.randint(0, t["classes"], (t["batch"],))
        results["configs"].append(run_config(
            f"block d{t['d']} T{t['T']} b{t['batch']}", net, x, y, None, args))
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = render(results)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
