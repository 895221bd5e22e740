"""Sign symmetry's B on the C++ core (native sign_feedback) against torch.copysign, bit for bit.

feedback_of's reference line is torch.copysign(feedback, W): magnitude s (every entry of the
buffer is +-s), sign bit of W, so -0.0 gives -s and a NaN gives s with the NaN's sign. The C++
loop writes (W_bits & sign) | |s|_bits; these tests compare bits (an int view), not values, on
weights holding zeros of both signs, subnormals, infinities and NaNs of both signs. The loop
serves plain eager contiguous CPU float32/float64 calls only, and writes over the buffer only
where nothing else holds it; everything else must take the copysign line.
"""

import pytest
import torch
from torch import nn

import manualbp as mb
from manualbp import native, rules

DTYPES = [torch.float32, torch.float64]
INT = {torch.float32: torch.int32, torch.float64: torch.int64}


@pytest.fixture(scope="module")
def lib():
    lib = native.load()
    if lib is None:
        pytest.skip("the C++ core is not available here (no toolchain, or MANUALBP_NATIVE=0)")
    return lib


def special_W(shape, dtype):
    """Random weights salted with +-0.0, subnormals, +-inf and NaNs of both sign bits."""
    torch.manual_seed(3)
    W = torch.randn(shape, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    nan = torch.tensor(float("nan"), dtype=dtype)
    minus_nan = (nan.view(INT[dtype]) | torch.iinfo(INT[dtype]).min).view(dtype)
    assert torch.signbit(minus_nan) and not torch.signbit(nan)
    special = torch.stack([torch.tensor(v, dtype=dtype) for v in
                           (0.0, -0.0, tiny / 4, -tiny / 4, float("inf"), float("-inf"))]
                          + [nan, minus_nan])
    flat = W.view(-1)
    where = torch.randperm(flat.numel())[:4 * special.numel()]
    flat[where] = special.repeat(4)
    return W


def bits(t):
    return t.contiguous().view(INT[t.dtype])


def feedback_like(W, s):
    """A sign-symmetry buffer of W's shape: every entry +-s, the first one -s."""
    buf = torch.copysign(torch.tensor(s, dtype=W.dtype), torch.randn(W.shape, dtype=W.dtype))
    buf.view(-1)[0] = -s  # s is |feedback[0]|, whatever its sign
    return buf


@pytest.mark.parametrize("shape", [(7, 5), (256, 256), (3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_sign_feedback_is_copysign_bit_for_bit(lib, dtype, shape):
    W = special_W(shape, dtype)
    buf = feedback_like(W, 0.37)
    want = torch.copysign(buf, W)
    got = lib.sign_feedback(W, buf)
    assert got is not None and got is not buf and got.dtype == dtype and got.shape == W.shape
    assert torch.equal(bits(got), bits(want))
    held = buf.clone()
    assert lib.sign_feedback(W, held, True) is held  # written over: the same bits
    assert torch.equal(bits(held), bits(want))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_feedback_of_gives_copysigns_bits_on_every_layout(dtype, contiguous):
    layer = mb.Linear(9, 6, rule="sign_symmetry", dtype=dtype)
    W = special_W((6, 9), dtype) if contiguous else special_W((9, 6), dtype).t()
    assert W.is_contiguous() == contiguous
    layer.weight = nn.Parameter(W)
    want = torch.copysign(layer.feedback, W)
    for _ in range(3):  # a new tensor, then the buffer written over (nothing else holds it)
        B = rules.feedback_of(layer)
        assert B is layer.feedback and torch.equal(bits(B), bits(want))
    with native.paused():  # the Python backend's line
        assert torch.equal(bits(rules.feedback_of(layer)), bits(want))


class Spy:
    """Records what native sign_feedback was handed and gave back."""

    def __init__(self, lib):
        self.real, self.calls = lib.sign_feedback, []

    def __call__(self, W, feedback, in_place=False):
        out = self.real(W, feedback, in_place)
        self.calls.append(out is not None)
        return out


@pytest.fixture
def spy(lib, monkeypatch):
    spy = Spy(lib)
    monkeypatch.setattr(lib, "sign_feedback", spy)
    return spy


def test_the_native_kernel_serves_plain_eager_float_calls_on_every_path(spy):
    torch.manual_seed(4)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    mlp = mb.MLP([4, 6, 3], rule="sign_symmetry")
    mlp.backprop(x, y)
    mlp.loss(x, y)[0].backward()
    seq = nn.Sequential(mb.Linear(4, 6, activation="relu", rule="ss"), mb.Linear(6, 3, rule="ss"))
    seq(x).sum().backward()
    assert spy.calls == [True] * 6


@pytest.mark.parametrize("case", ["strided W", "float16", "bfloat16", "autocast", "paused",
                                  "vmap", "jit trace", "forward AD"])
def test_the_copysign_line_serves_everything_else(spy, case):
    torch.manual_seed(5)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    layer = mb.Linear(4, 3, rule="sign_symmetry", dtype=dtype)
    if case == "strided W":
        layer.weight = nn.Parameter(torch.randn(4, 3).t())
    with torch.no_grad():
        layer.weight[0, :2] = torch.tensor([0.0, -0.0])
    want = torch.copysign(layer.feedback, layer.weight.detach())
    x = torch.randn(2, 4, dtype=dtype)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            B = rules.feedback_of(layer)
    elif case == "paused":
        with native.paused():
            B = rules.feedback_of(layer)
    elif case == "vmap":  # torch.func: the buffer is not rebound there
        before, got = layer.feedback, []
        torch.func.vmap(lambda row: got.append(rules.feedback_of(layer)) or row)(x)
        assert layer.feedback is before
        B = got[0]
    elif case == "jit trace":
        torch.jit.trace(layer, x, check_trace=False)  # the copysign op goes in the trace
        B = layer.feedback
    elif case == "forward AD":
        with torch.autograd.forward_ad.dual_level():
            B = rules.feedback_of(layer)
    else:
        B = rules.feedback_of(layer)
    assert spy.calls in ([], [False])  # never served: not asked, or asked and declined
    torch.testing.assert_close(B, want, rtol=0, atol=0)
    assert torch.equal(torch.signbit(B), torch.signbit(want))


def test_the_buffer_is_written_over_only_where_nothing_else_holds_it(lib):
    torch.manual_seed(6)
    layer = mb.Linear(4, 3, rule="sign_symmetry")
    rules.feedback_of(layer)

    def flip():  # a new W sign pattern, so a written-over buffer would show it
        with torch.no_grad():
            layer.weight.neg_()
        return rules.feedback_of(layer)

    held = layer.feedback  # kept by the caller: a snapshot, never written over
    snapshot = held.clone()
    assert flip() is not held and torch.equal(held, snapshot)
    del held
    for alias in (lambda b: b.detach(), lambda b: b.data, lambda b: b[0],
                  lambda b: b.untyped_storage(), lambda b: layer.state_dict()["feedback"]):
        kept = alias(layer._buffers["feedback"])
        buf_id, before = id(layer._buffers["feedback"]), layer.feedback.clone()
        assert id(flip()) != buf_id and torch.equal(layer._buffers["feedback"], -before)
        del kept
    x = torch.randn(2, 4, requires_grad=True)  # a graph that saved B for its backward
    out = layer(x)
    saved = layer.feedback.clone()
    assert flip() is not None
    grad_x, = torch.autograd.grad(out, x, torch.ones(2, 3))
    assert torch.equal(grad_x, torch.ones(2, 3) @ saved)  # the B of its own forward
    del out
    buf = layer._buffers["feedback"]
    version = buf._version
    buf_id = id(buf)
    del buf
    B = flip()  # nothing holds it now: written over, its version bumped
    assert id(B) == buf_id and B._version > version
    assert torch.equal(B, torch.copysign(B, layer.weight.detach()))


@pytest.mark.parametrize("how", ["load_state_dict", "in place", "rebound"])
def test_a_buffer_written_by_other_code_is_read_entry_by_entry(spy, how):
    """The kernel reads s from feedback[0]: a buffer whose magnitudes differ (loaded, edited by
    hand) must not take it, so every backend gives copysign(feedback, W) entry by entry."""
    torch.manual_seed(7)
    layer = mb.Linear(5, 4, rule="sign_symmetry")
    rules.feedback_of(layer)  # the kernel's own buffer from here on
    assert spy.calls == [True]
    odd = torch.rand(4, 5) + 0.5  # magnitudes differ entry by entry
    if how == "load_state_dict":
        layer.load_state_dict({**layer.state_dict(), "feedback": odd})
    elif how == "in place":
        with torch.no_grad():
            layer.feedback.copy_(odd)
    else:
        layer.feedback = odd.clone()
    want = torch.copysign(odd, layer.weight.detach())
    B = rules.feedback_of(layer)
    assert spy.calls == [True]  # not asked
    assert torch.equal(B, want)
    with native.paused():
        assert torch.equal(rules.feedback_of(layer), want)
    with torch.no_grad():  # a +-s buffer written by other code: read once, then served again
        layer.feedback.copy_(rules.sign_feedback(layer.weight, torch.tensor(0.25)))
    B = rules.feedback_of(layer)
    assert spy.calls[-1] is True
    assert torch.equal(B, torch.copysign(torch.tensor(0.25), layer.weight.detach()))
    rules.feedback_of(layer)
    assert spy.calls[-1] is True
