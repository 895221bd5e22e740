"""softmax_cross_entropy's C++ fast path took reduction and ignore_index as typed arguments:
reduction=None, ignore_index=-100.0 or one past int64 failed there with pybind's
'softmax_ce_plain(): incompatible function arguments' (the Python passes: the reduction named,
but an ignore_index the kernel's schema refused, deep). Both backends now say in one line what
is wrong, and a usable ignore_index (a numpy int) still works."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import manualbp as mb

D = torch.float64


def _inputs(shape):
    torch.manual_seed(0)
    z = torch.randn(*shape, dtype=D)
    y = torch.randint(0, shape[1], shape[:1] + shape[2:])
    return z, y


_SHAPES = {"(N, C)": (5, 4), "(N, C, d)": (3, 4, 2)}


@pytest.mark.parametrize("shape", sorted(_SHAPES))
@pytest.mark.parametrize("reduction", [None, 1, "avg"])
def test_an_unknown_reduction_is_named(core, shape, reduction):
    z, y = _inputs(_SHAPES[shape])
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: expected reduction 'mean', "
                                         r"'sum' or 'none', got " + repr(reduction)):
        mb.softmax_cross_entropy(z, y, reduction=reduction)


@pytest.mark.parametrize("shape", sorted(_SHAPES))
@pytest.mark.parametrize("ignore_index", [-100.0, 2**63, "-100", None])
def test_an_ignore_index_that_is_not_an_int64_is_named(core, shape, ignore_index):
    z, y = _inputs(_SHAPES[shape])
    with pytest.raises(TypeError, match=r"softmax_cross_entropy: expected ignore_index to be "
                                        r"a 64-bit int .*, got "):
        mb.softmax_cross_entropy(z, y, ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [np.int64(1), -2**63, 2**63 - 1])
def test_an_int_like_ignore_index_still_serves(core, ignore_index):
    z, y = _inputs((5, 4))
    zm, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = mb.softmax_cross_entropy(zm, y, ignore_index=ignore_index)
    want = F.cross_entropy(zr, y, ignore_index=int(ignore_index))
    g = torch.tensor(-1.7, dtype=D)
    loss.backward(g)
    want.backward(g)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    torch.testing.assert_close(zm.grad, zr.grad, rtol=1e-12, atol=1e-15)
