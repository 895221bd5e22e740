"""The MLP node (C++ and Python alike) lets each tensor of its backward go once it has served.

autograd's per-op nodes free a[i] as the backward passes layer i; a node that held every a[i]
and z[i] to its end would peak higher by all of them (1.4x autograd's step at
[784,256,256,10]). The node keeps them out of save_for_backward, so these tests also pin what
that must not change: retain_graph, a second backward's refusal, saved-tensor hooks (which must
still see every tensor kept), and the bits.
"""

import pytest
import torch
import torch.nn.functional as F
from oracle import noncontiguous_randn
from torch import nn
from torch.profiler import ProfilerActivity, profile

import manualbp as mb
from manualbp import native


def peak_bytes(step) -> int:
    """The highest running total of CPU bytes allocated during step(), above its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if hasattr(fields, "alloc_size") and str(fields.device).startswith("cpu"):
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(node.children)
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


def steps(sizes, batch):
    """name -> (model, step): each fills .grad from None, as a training step does."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))

    def sequential():
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    mlp, twin, chain = mb.MLP(sizes, "relu"), sequential(), mb.convert(sequential())
    return {
        "autograd": (twin, lambda: F.cross_entropy(twin(x), y).backward()),
        "natural": (mlp, lambda: mb.softmax_cross_entropy(mlp(x), y).backward()),
        "mlp.loss": (mlp, lambda: mlp.loss(x, y)[0].backward()),
        "convert": (chain, lambda: F.cross_entropy(chain(x), y).backward()),
        "backprop": (mlp, lambda: mlp.backprop(x, y)),
    }


def peak_ratio(name, sizes, batch):
    runs = steps(sizes, batch)
    peaks = {}
    for key in ("autograd", name):
        model, step = runs[key]
        step()  # first call: lazy set-up out of the way
        model.zero_grad(set_to_none=True)
        peaks[key] = peak_bytes(step)
        model.zero_grad(set_to_none=True)
    return peaks[name] / peaks["autograd"]


@pytest.mark.parametrize("name", ["natural", "mlp.loss", "convert", "backprop"])
def test_step_peaks_no_higher_than_autograds(name, core):
    # [64,256,256,10] b128: held to the node's end, a[1], a[2] (128 KiB each) made it 1.21x
    assert peak_ratio(name, [64, 256, 256, 10], 128) <= 1.02


@pytest.mark.parametrize("name", ["natural", "mlp.loss", "convert", "backprop"])
def test_native_step_peaks_no_higher_than_autograds_with_square_layers(name):
    # square layers put the peak at layer L-1's GEMMs, where autograd has let dL/da[L] (and
    # mlp.loss its log yhat, backprop its delta[L]) go: the C++ node must too (it made 1.2x).
    # The Python twins still hold them there (autograd.Function passes the upstream gradient
    # as an argument; the engine-free pass keeps its names): 1.2x, not asserted.
    if native.load() is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")
    assert peak_ratio(name, [128, 128, 128, 128], 128) <= 1.02


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])  # g' from a, from a, from z
def test_retain_graph_backwards_accumulate_and_match_across_backends(activation):
    torch.manual_seed(1)
    mlp = mb.MLP([6, 9, 7, 4], activation)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    g = noncontiguous_randn((5, 4), dtype=torch.float32)

    def run():
        mlp.zero_grad(set_to_none=True)
        logits, loss = mlp.loss(x, y)[::-1]
        seen = []
        for retain in (True, True, False):  # the last one lets the graph go
            torch.autograd.backward([logits, loss], [g, torch.tensor(0.7)], retain_graph=retain)
            seen.append(grads(mlp))
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()
        return seen

    mine = run()
    with native.paused():
        ref = run()
    for a, b in zip(mine, ref, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
    for u, v in zip(mine[0], mine[2], strict=True):  # three equal backwards accumulated
        assert torch.allclose(v, 3 * u, rtol=1e-5, atol=1e-6)


def test_saved_tensor_hooks_still_see_every_kept_tensor(core):
    # with hooks set (save_on_cpu, checkpointing, a counter) the node saves a[i], z[i] through
    # save_for_backward as before, so the hooks see them; the gradients are the same bits
    torch.manual_seed(2)
    mlp = mb.MLP([6, 9, 7, 4], "gelu")  # gelu's g' reads z: z[1], z[2] are kept
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    mlp.loss(x, y)[0].backward()
    plain = grads(mlp)
    mlp.zero_grad(set_to_none=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        loss = mlp.loss(x, y)[0]
    assert {(5, 9), (5, 7)} <= {tuple(t.shape) for t in packed}
    loss.backward()
    for u, v in zip(plain, grads(mlp), strict=True):
        assert torch.equal(u, v)
    mlp.zero_grad(set_to_none=True)
    with torch.autograd.graph.save_on_cpu():
        mlp.loss(x, y)[0].backward()
    for u, v in zip(plain, grads(mlp), strict=True):
        assert torch.equal(u, v)


def test_autograd_grad_without_retain_then_refuses_a_second_time():
    torch.manual_seed(3)
    mlp = mb.MLP([6, 9, 4], "sigmoid")
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    loss = mb.softmax_cross_entropy(mlp(x), y)
    first = torch.autograd.grad(loss, list(mlp.parameters()))
    with native.paused():
        ref = torch.autograd.grad(mb.softmax_cross_entropy(mlp(x), y), list(mlp.parameters()))
    for u, v in zip(first, ref, strict=True):
        assert torch.equal(u, v)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, list(mlp.parameters()))


def test_python_twin_without_torchs_hook_readings_saves_everything_as_before(monkeypatch):
    # torch 2.6 and 2.7 cannot read the saved-tensor hook stack: the Python twin must then
    # keep every tensor in save_for_backward (hooks, if any, see them), with the same bits
    from manualbp import fused

    torch.manual_seed(4)
    mlp = mb.MLP([6, 9, 7, 4], "gelu")
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    with native.paused():
        loss = mlp.loss(x, y)[0]
        assert loss.grad_fn.inner is not None  # this torch can read it: held on ctx
        loss.backward()
        plain = grads(mlp)
        mlp.zero_grad(set_to_none=True)
        monkeypatch.setattr(fused, "_TOP_HOOKS", None)
        loss = mlp.loss(x, y)[0]
        assert loss.grad_fn.inner is None
        loss.backward()
    for u, v in zip(plain, grads(mlp), strict=True):
        assert torch.equal(u, v)
