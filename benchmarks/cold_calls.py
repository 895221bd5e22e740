"""Where the MLP node's step spends the time its kernels do not (issue 12, [784,256,256,10]).

Interleaved in one process, one thread: the node step through `loss.backward()`, the same step
handing the engine its root gradient directly (no Python `torch.autograd.backward` wrapper),
the engine-free step, autograd's step both ways and the native floor; then the cost of one
tiny op right after a sweep that evicts the caches (as the forward's GEMMs do) against the same
op with the caches warm.

    cd benchmarks && python cold_calls.py [rounds]
"""

import statistics
import sys
import time

import torch

import manualbp as mb
from manualbp.native import lib as native_lib


def main(rounds: int = 30) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lib = native_lib()
    if lib is None:
        sys.exit("cold_calls.py times the C++ core: run it with MANUALBP_NATIVE unset or 1")
    net = mb.MLP([784, 256, 256, 10], activation="relu")
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    params, acts = net._flat()
    run_backward = torch.autograd.Variable._execution_engine.run_backward
    one = torch.ones(())

    def node():
        net.zero_grad()
        lib.mlp(x, y, acts, params)[1].backward()

    def node_engine():  # what loss.backward() does once its Python wrapper has made the root grad
        net.zero_grad()
        loss = lib.mlp(x, y, acts, params)[1]
        run_backward((loss,), (one,), False, False, (), True, True)

    ref = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10))
    ref_params = list(ref.parameters())

    def autograd():
        for p in ref_params:
            p.grad = None
        torch.nn.functional.cross_entropy(ref(x), y).backward()

    def autograd_engine():
        for p in ref_params:
            p.grad = None
        run_backward((torch.nn.functional.cross_entropy(ref(x), y),), (one,), False, False, (),
                     True, True)

    def backprop():
        lib.backprop(x, y, params, acts, False)

    steps = {"node .backward()": node, "node, engine direct": node_engine,
             "lib.backprop": backprop, "autograd .backward()": autograd,
             "autograd, engine direct": autograd_engine}
    samples = {name: [] for name in [*steps, "floor"]}
    for _ in range(20):
        for fn in steps.values():
            fn()
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            samples[name].append((time.perf_counter() - t0) / 10)
        samples["floor"].append(lib.floor_seconds(x, y, params, acts, 10))
    floor = statistics.median(samples["floor"])
    auto = statistics.median(samples["autograd .backward()"])
    for name, s in samples.items():
        m = statistics.median(s)
        print(f"{name:24s} {m * 1e6:7.0f} us  floor + {(m - floor) * 1e6:5.0f} us  "
              f"{m / auto:.3f}x autograd .backward()")

    sweep, small = torch.zeros(2**21), torch.zeros(2**10)  # 8 MB (> L2), 4 KB
    for name, pre in (("after an 8 MB sweep", lambda: sweep.add_(1)),
                      ("after a 4 KB op", lambda: small.add_(1))):
        ts = []
        for _ in range(300):
            pre()
            t0 = time.perf_counter()
            torch.ones(())
            ts.append(time.perf_counter() - t0)
        print(f"torch.ones(()) {name:20s} {statistics.median(ts) * 1e6:5.1f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
