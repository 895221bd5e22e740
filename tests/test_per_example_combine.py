"""per_example_norms._combine, the sum over shares of S[i] * S[j] (or S[i]) that gives the squared
norms of 2-D shares and (B, T, n) biases: each of its forms equals the plain sum, and the usual
mixes (one pair, a run of singles: a transformer block's 2-D head beside its biases' sums over
T) are taken from views of S, without the index tensors that cost a small block's finish."""

import pytest
import torch

from manualbp.per_example_norms import _combine


def plain(S, pairs):
    return sum(S[i] * S[j] if j is not None else S[i] for _, i, j in pairs)


@pytest.mark.parametrize("pairs, indexed", [
    ([(k, k, None) for k in range(6)] + [("W", 6, 7), ("b", 6, None)], False),  # the block
    ([(0, 0, None), (1, 1, None), (2, 2, None)], False),  # biases over T alone
    ([("W", 3, 4)], False),  # a 2-D head alone
    ([("W", 0, 1), ("b", 0, None), ("W", 2, 3), ("b", 2, None), ("W", 4, 5)], True),
    ([("W", 0, 1), ("b", 5, None), ("b", 2, None)], True),  # singles out of order
], ids=["block", "singles", "one-pair", "mixed-bias", "unordered"])
def test_combine_equals_the_plain_sum(pairs, indexed, monkeypatch):
    torch.manual_seed(0)
    S = torch.rand(8, 5, dtype=torch.float64)
    before = S.clone()
    if not indexed:  # the views of S serve: no index tensor is made
        def refuse(*args, **kwargs):
            raise AssertionError("_combine made an index tensor")
        monkeypatch.setattr(torch, "tensor", refuse)
    total = _combine(S, pairs)
    monkeypatch.undo()
    torch.testing.assert_close(total, plain(S, pairs), rtol=1e-14, atol=0)
    total.add_(1.0)  # the finish adds the (B, T, n) W parts into it in place
    assert torch.equal(S, before)
