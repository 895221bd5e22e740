"""The C++ core (manualbp/native) against the Python passes: bit for bit, every path.

Each test runs one computation twice, once through the native Functions and once with them
paused (the Python Functions), from the same weights and inputs, fed random signed
non-contiguous upstream gradients, and asserts torch.equal on values and every gradient. It
also asserts which node ran, so a dispatch that silently took the other path fails. The
existing suites compare whichever backend is active with autograd; `make test` runs them once
native and once with MANUALBP_NATIVE=0.
"""

import pytest
import torch
from oracle import leaves, noncontiguous_randn
from test_activations import TORCH_G
from torch.autograd import gradcheck, gradgradcheck

import manualbp as mb
from manualbp import native

NAMES = sorted(TORCH_G)
DTYPES = [torch.float32, torch.float64]
LEADS = [(), (5,), (2, 3)]


@pytest.fixture(scope="module", autouse=True)
def built():
    """The extension: built here if need be. With MANUALBP_NATIVE=1 (as CI sets) a failed build
    is an error; otherwise these tests skip where no toolchain is present."""
    if native.load() is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")


def node(t) -> str:
    """The name of the node that made t, looking through a reshape."""
    fn = t.grad_fn
    while fn.name().startswith(("ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward")):
        fn = fn.next_functions[0][0]
    return fn.name()


def assert_equal(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max().item():.3e}"


def twice(run):
    """run() natively and with the native Functions paused; (native result, Python result)."""
    mine = run()
    with native.paused():
        ref = run()
    return mine, ref


def mlp_run(mlp, x, y, g, with_loss):
    def run():
        mlp.zero_grad(set_to_none=True)
        xs = x.detach().clone().requires_grad_()
        if with_loss:
            loss, logits = mlp.loss(xs, y)
            (-1.5 * loss + (logits * g).sum()).backward()
        else:
            logits, loss = mlp(xs), None
            logits.backward(g)
        return node(logits), logits.detach(), loss, xs.grad, [p.grad for p in mlp.parameters()]

    return run


@pytest.mark.parametrize("with_loss", [False, True], ids=["logits", "loss"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_mlp_node_is_bit_identical_to_the_python_function(name, bias, lead, dtype, with_loss):
    torch.manual_seed(40)
    mlp = mb.MLP([5, 7, 6, 4], activation=name, bias=bias, dtype=dtype)
    x = torch.randn(*lead, 5, dtype=dtype)
    y = torch.randint(0, 4, lead)
    g = noncontiguous_randn((*lead, 4), dtype)
    mine, ref = twice(mlp_run(mlp, x, y, g, with_loss))
    assert "MLPNode" in mine[0] and ref[0].startswith("MLPEagerFunction")
    for what, a, b in zip(["logits", "loss", "x.grad"], mine[1:4], ref[1:4], strict=True):
        assert_equal(a if a is None else a.detach(), b if b is None else b.detach(), what)
    for i, (a, b) in enumerate(zip(mine[4], ref[4], strict=True)):
        assert_equal(a, b, f"grad of parameter {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_backprop_step_is_bit_identical_and_accumulates(name, bias, lead, dtype):
    torch.manual_seed(41)
    mlp = mb.MLP([5, 7, 6, 4], activation=name, bias=bias, dtype=dtype)
    mlp.layers[1].weight.requires_grad_(False)  # a frozen parameter gets no .grad
    x, y = torch.randn(*lead, 5, dtype=dtype), torch.randint(0, 4, lead)
    y.view(-1)[1] = -100  # left out of the mean, as F.cross_entropy

    def run():
        mlp.zero_grad(set_to_none=True)
        first = mlp.backprop(x, y)
        once = [None if p.grad is None else p.grad.clone() for p in mlp.parameters()]
        second = mlp.backprop(x, y)  # accumulates
        twice_ = [p.grad for p in mlp.parameters()]
        mlp.backprop(x, y, accumulate=False)  # replaces
        return first, second, once, twice_, [p.grad for p in mlp.parameters()]

    mine, ref = twice(run)
    assert not mine[0].requires_grad and mlp.layers[1].weight.grad is None
    assert_equal(mine[0], ref[0], "loss")
    assert_equal(mine[1], ref[1], "loss again")
    for k in (2, 3, 4):
        for i, (a, b) in enumerate(zip(mine[k], ref[k], strict=True)):
            assert_equal(a, b, f"grad {k} of parameter {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_linear_act_is_bit_identical_to_the_python_function(name, bias, lead, dtype):
    torch.manual_seed(42)
    x, W = torch.randn(*lead, 6, dtype=dtype), torch.randn(4, 6, dtype=dtype)
    b = torch.randn(4, dtype=dtype) if bias else None
    g = noncontiguous_randn((*lead, 4), dtype)

    def run():
        xs, Ws, bs = leaves(x, W, b)
        out = mb.linear_act(xs, Ws, bs, name)
        out.backward(g)
        return node(out), out.detach(), [t.grad for t in (xs, Ws, bs) if t is not None]

    mine, ref = twice(run)
    assert "LinearActNode" in mine[0] and ref[0].startswith("LinearAct")
    assert_equal(mine[1], ref[1], "a")
    for i, (p, q) in enumerate(zip(mine[2], ref[2], strict=True)):
        assert_equal(p, q, f"grad of input {i}")


def test_linear_act_honours_needs_input_grad():
    torch.manual_seed(43)
    x, W, b = torch.randn(3, 4), torch.randn(2, 4, requires_grad=True), torch.randn(2)
    g = noncontiguous_randn((3, 2), torch.float32)

    def run():
        out = mb.linear_act(x, W, b, "gelu")  # only W wants a gradient
        return node(out), torch.autograd.grad(out, [W], g)[0]

    mine, ref = twice(run)
    assert "LinearActNode" in mine[0]
    assert_equal(mine[1], ref[1], "grad W")


SCE_CASES = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore_index=2),
    "smoothing": dict(label_smoothing=0.2),
    "all": dict(weight=True, ignore_index=1, label_smoothing=0.1),
    "probabilities": dict(probs=True),
    "probabilities+weight+smoothing": dict(probs=True, weight=True, label_smoothing=0.3),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(SCE_CASES))
def test_softmax_cross_entropy_is_bit_identical(case, reduction, dtype):
    torch.manual_seed(44)
    opts = dict(SCE_CASES[case])
    probs, use_weight = opts.pop("probs", False), opts.pop("weight", False)
    z = torch.randn(6, 4, dtype=dtype)
    if probs:
        target = torch.softmax(torch.randn(6, 4, dtype=dtype), 1)
    else:
        target = torch.tensor([0, 3, 2, 1, 3, 1])
        target[4] = opts.get("ignore_index", -100)
    if use_weight:
        opts["weight"] = torch.rand(4, dtype=dtype) + 0.1

    g = torch.full((), -1.5, dtype=dtype)
    if reduction == "none":
        g = noncontiguous_randn((6,), dtype)

    def run():
        zs, ts = leaves(z, target)
        loss = mb.softmax_cross_entropy(zs, ts, reduction=reduction, **opts)
        loss.backward(g)
        return node(loss), loss.detach(), zs.grad, ts.grad if probs else None

    mine, ref = twice(run)
    assert "SoftmaxCENode" in mine[0] and "SoftmaxCrossEntropyFunction" in ref[0]
    for what, a, b in zip(["loss", "grad z", "grad target"], mine[1:], ref[1:], strict=True):
        assert_equal(a, b, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "weight", "pos_weight"])
def test_bce_and_mse_are_bit_identical(options, reduction, dtype):
    torch.manual_seed(45)
    z, y = torch.randn(5, 3, dtype=dtype), torch.rand(5, 3, dtype=dtype)
    kw = {"weight": dict(weight=torch.rand(3, dtype=dtype)),
          "pos_weight": dict(pos_weight=torch.rand(3, dtype=dtype) + 0.5)}.get(options, {})
    g = torch.full((), 0.7, dtype=dtype)
    if reduction == "none":
        g = noncontiguous_randn((5, 3), dtype)

    def run():
        out = []
        for loss_fn, args in ((mb.sigmoid_binary_cross_entropy, kw), (mb.mse_loss, {})):
            zs, ys = leaves(z, y)
            loss = loss_fn(zs, ys, reduction=reduction, **args)
            loss.backward(g)
            out.append((node(loss), loss.detach(), zs.grad, ys.grad))
        return out

    mine, ref = twice(run)
    assert "SigmoidBCENode" in mine[0][0] and "MSENode" in mine[1][0]
    assert "SigmoidBCEFunction" in ref[0][0] and "MSEFunction" in ref[1][0]
    for m, r in zip(mine, ref, strict=True):
        for what, a, b in zip(["loss", "grad input", "grad target"], m[1:], r[1:], strict=True):
            assert_equal(a, b, f"{m[0]} {what}")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "logistic"])  # an alias of sigmoid
def test_native_nodes_pass_gradcheck_and_gradgradcheck(name):
    # The C++ nodes save only inputs and outputs, or rebuild z from the saved inputs under
    # create_graph, so second derivatives are exact, as the Python Functions'.
    torch.manual_seed(46)
    mlp = mb.MLP([3, 4, 3], activation=name, dtype=torch.float64)
    x = (torch.rand(5, 3, dtype=torch.float64) + 0.2).requires_grad_()  # off relu's kink
    y = torch.tensor([0, 2, 1, 2, 0])
    params = list(mlp.parameters())
    acts = tuple(layer.activation for layer in mlp.layers)
    lib = native.load()

    def loss(x, *ps):
        return lib.mlp(x, y, acts, list(ps))[1]

    def logits(x, *ps):
        return lib.mlp(x, None, acts, list(ps))[0]

    def layer(x, W, b):
        return lib.linear_act(x, W, b, name)

    for f, inputs in ((loss, (x, *params)), (logits, (x, *params)), (layer, (x, *params[:2]))):
        inputs = leaves(*inputs)
        assert "CppNode" in node(f(*inputs))
        assert gradcheck(f, inputs, fast_mode=True) and gradgradcheck(f, inputs, fast_mode=True)


def test_native_losses_pass_gradgradcheck():
    torch.manual_seed(47)
    lib = native.load()
    z, p = leaves(torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64))
    y, w = torch.tensor([0, 2, -100, 1]), torch.rand(3, dtype=torch.float64) + 0.1
    checks = [
        (lambda z: lib.softmax_cross_entropy(z, y, w, -100, "mean", 0.1)[0], (z,)),
        (lambda z, p: lib.softmax_cross_entropy(z, p, None, -100, "sum", 0.0)[0], (z, p)),
        (lambda z, p: lib.sigmoid_binary_cross_entropy(z, p, None, w, "mean"), (z, p)),
        (lambda z, p: lib.mse_loss(z, p, "sum"), (z, p)),
    ]
    for f, inputs in checks:
        assert gradcheck(f, inputs, fast_mode=True) and gradgradcheck(f, inputs, fast_mode=True)


def test_paths_the_native_core_does_not_serve_take_the_python_functions():
    mlp = mb.MLP([4, 5, 3])
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    assert "CppNode" in node(mlp.loss(x, y)[0])
    assert node(mlp(x, trace=mb.Trace())).startswith("MLPFunction")  # a Trace
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert node(mlp(x)).startswith("MLPFunction")
    assert node(mlp.to(torch.bfloat16)(x.bfloat16())).startswith("MLPFunction")  # half dtypes
    with native.paused():  # what tests and per_example blocks use
        assert node(mlp.float().loss(x, y)[0]).startswith("MLPEagerFunction")
    per_sample = torch.func.vmap(lambda x: mb.linear_act(x, torch.ones(2, 4), None, "relu"))
    assert per_sample(torch.randn(3, 4)).shape == (3, 2)  # torch.func: the Python Function


@pytest.fixture
def switch(monkeypatch):
    """monkeypatch, with the switch read afresh before each use and after the test."""
    yield monkeypatch
    monkeypatch.undo()
    native.reset()


def test_switch_off_and_bad_values(switch):
    monkeypatch = switch
    monkeypatch.setenv("MANUALBP_NATIVE", "0")
    native.reset()
    assert native.lib() is None
    assert node(mb.MLP([4, 3]).loss(torch.randn(2, 4), torch.tensor([0, 1]))[0]).startswith(
        "MLPEagerFunction")
    monkeypatch.setenv("MANUALBP_NATIVE", "yes")
    native.reset()
    with pytest.raises(ValueError, match=r"MANUALBP_NATIVE: expected 0, 1 or auto .*got 'yes'"):
        native.lib()
    monkeypatch.setenv("MANUALBP_NATIVE", "1")
    native.reset()
    assert native.lib() is not None


def test_auto_falls_back_with_one_logged_line(switch, caplog):
    def no_toolchain():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch = switch
    monkeypatch.delenv("MANUALBP_NATIVE", raising=False)
    native.reset()
    monkeypatch.setattr(native, "_build", no_toolchain)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    mlp = mb.MLP([4, 3])
    with caplog.at_level("WARNING", logger="manualbp"):
        for _ in range(3):
            loss, _ = mlp.loss(torch.randn(2, 4), torch.tensor([0, 1]))
            assert node(loss).startswith("MLPEagerFunction")
    lines = [r.getMessage() for r in caplog.records if r.name == "manualbp"]
    assert len(lines) == 1 and "C++ core unavailable, running the Python passes" in lines[0]
    assert "Ninja is required" in lines[0]
    monkeypatch.setenv("MANUALBP_NATIVE", "1")
    monkeypatch.setattr(native, "_tried", False)
    native.reset()
    with pytest.raises(RuntimeError, match=r"MANUALBP_NATIVE=1: the C\+\+ core could not be "
                                           r"built \(RuntimeError: Ninja is required.*pip "
                                           r"install ninja"):
        mlp.loss(torch.randn(2, 4), torch.tensor([0, 1]))


@pytest.mark.slow
def test_forced_native_without_a_compiler_is_a_clear_error(tmp_path):
    # A real missing toolchain: no compiler or ninja on PATH, an empty build folder.
    import os
    import subprocess
    import sys

    env = {**os.environ, "MANUALBP_NATIVE": "1", "MANUALBP_BUILD_DIR": str(tmp_path),
           "PATH": str(tmp_path / "nothing"), "CXX": str(tmp_path / "no-c++")}
    code = "import torch, manualbp as mb; mb.MLP([2, 2])(torch.randn(1, 2))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: MANUALBP_NATIVE=1: the C++ core could not be built")
    assert "unset MANUALBP_NATIVE (or set it to 0) to run the Python passes" in last


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_cuda_native_is_bit_identical(name):
    torch.manual_seed(48)
    mlp = mb.MLP([5, 7, 4], activation=name).cuda()
    x, y = torch.randn(8, 5, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    g = noncontiguous_randn((8, 4), torch.float32, "cuda")
    mine, ref = twice(mlp_run(mlp, x, y, g, True))
    assert "MLPNode" in mine[0]
    for a, b in zip([mine[1], mine[2].detach(), mine[3], *mine[4]],
                    [ref[1], ref[2].detach(), ref[3], *ref[4]], strict=True):
        assert_equal(a, b, "cuda")


def test_mlp_zero_grad_clears_every_gradient_the_fast_way_and_the_general_way():
    mlp = mb.MLP([4, 5, 3])
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    mlp.backprop(x, y)
    mlp.zero_grad()
    assert all(p.grad is None for p in mlp.parameters())
    mlp.backprop(x, y)
    mlp.zero_grad(set_to_none=False)  # nn.Module's own: zeros kept in place
    assert all(p.grad is not None and not p.grad.any() for p in mlp.parameters())
    parametrize = torch.nn.utils.parametrize
    parametrize.register_parametrization(mlp.layers[0], "weight", torch.nn.Identity())
    mlp.loss(x, y)[0].backward()
    mlp.zero_grad()  # a parametrized layer keeps its weight elsewhere: the general walk
    assert all(p.grad is None for p in mlp.parameters())


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_native_forward_without_grad_mode_or_any_input_needing_grad(name):
    torch.manual_seed(49)
    mlp, layer = mb.MLP([4, 5, 3], activation=name), mb.Linear(4, 3, activation=name)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            if not grad_mode:
                mine, ref = twice(lambda: (layer(x), mlp(x), mlp.loss(x, y)[0]))
            else:
                layer.requires_grad_(False)
                mlp.requires_grad_(False)
                mine, ref = twice(lambda: (layer(x), mlp(x), mlp.loss(x, y)[0]))
        for a, b in zip(mine, ref, strict=True):
            assert not a.requires_grad
            assert_equal(a, b, "forward")


@pytest.mark.parametrize("lead", [(), (2,)])
def test_an_in_place_change_to_a_saved_input_before_backward_is_caught(lead):
    """The nodes run their kernels below autograd's dispatch layers; what they save of the
    user's tensors (the target, itself or as a view) must still share its version counter, so
    that an in-place change between forward and backward raises as autograd's does."""
    torch.manual_seed(50)
    mlp = mb.MLP([5, 7, 3])
    x = torch.randn(*lead, 4, 5)
    for run in (lambda t: mlp.loss(x, t)[0],
                lambda t: mb.softmax_cross_entropy(mlp(x).reshape(-1, 3), t.reshape(-1))):
        for paused in (False, True):
            y = torch.randint(0, 3, (*lead, 4))
            with native.paused() if paused else torch.enable_grad():
                loss = run(y)
                assert ("CppNode" in node(loss)) != paused, node(loss)
                y.add_(0)  # bumps y's version, as any in-place op would
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    loss.backward()
