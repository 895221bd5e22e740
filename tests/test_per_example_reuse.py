"""A block's cached A A^T (q, k, v read one input) must never serve another tensor's values:
not a tensor written over in place between two backwards, not a new one in freed memory."""

import torch
from torch import nn

import manualbp as mb


def _layers():
    torch.manual_seed(0)
    # (B, T, n) = (3, 4, 16): T (n_in + n_out) <= n_in n_out, so both layers take the Gram form
    return nn.ModuleDict({"a": mb.Linear(16, 16, dtype=torch.float64),
                          "b": mb.Linear(16, 16, dtype=torch.float64)})


def _norm_alone(model, name, x, r):
    with mb.per_example(model, reduction="sum") as pe:
        (model[name](x) * r).sum().backward()
    model.zero_grad()
    return pe.norms


def test_an_input_written_over_between_two_backwards_is_not_read_from_the_cache(core):
    model = _layers()
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    old, new = x.clone(), torch.randn(3, 4, 16, dtype=torch.float64)
    r = torch.randn(3, 4, 16, dtype=torch.float64)
    want = (_norm_alone(model, "a", old, r).square()
            + _norm_alone(model, "b", new, r).square()).sqrt()
    with mb.per_example(model, reduction="sum") as pe:
        (model["a"](x) * r).sum().backward()
        with torch.no_grad():
            x.copy_(new)  # a reused input buffer: same memory, shape and strides
        (model["b"](x) * r).sum().backward()
    torch.testing.assert_close(pe.norms, want, rtol=1e-12, atol=0)
