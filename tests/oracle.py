"""The test oracle: torch autograd, fed random signed non-contiguous upstream gradients.

A sum() or mean() loss backprops all-ones, which cannot catch a wrong mask, sign or transpose;
a random signed gradient laid out with strides can.
"""

import torch


def noncontiguous_randn(shape, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Standard normal values of the given shape, stored with stride 2 in the last dim."""
    g = torch.randn(*shape, 2, dtype=dtype, device=device)[..., 0]
    assert len(shape) == 0 or g.numel() <= 1 or not g.is_contiguous()
    return g


def leaves(*tensors, dtype=None):
    """Detached copies that require grad (None and integer tensors pass through)."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
        else:
            out.append(t.detach().to(dtype or t.dtype).requires_grad_())
    return out


def assert_same_as_autograd(manual, reference, inputs, rtol=1e-7, atol=1e-9):
    """manual(*inputs) and reference(*inputs) agree in value and in every input gradient.

    Returns the manual gradients (None where an input needs none).
    """
    mine, ref = leaves(*inputs), leaves(*inputs)
    out_m, out_r = manual(*mine), reference(*ref)
    torch.testing.assert_close(out_m, out_r, rtol=rtol, atol=atol)
    g = noncontiguous_randn(out_r.shape, out_r.dtype, out_r.device)
    wanted = [t for t in mine if t is not None and t.requires_grad]
    grads_m = torch.autograd.grad(out_m, wanted, g, allow_unused=True)
    grads_r = torch.autograd.grad(out_r, [t for t in ref if t is not None and t.requires_grad],
                                  g, allow_unused=True)
    for i, (gm, gr) in enumerate(zip(grads_m, grads_r, strict=True)):
        torch.testing.assert_close(gm, gr, rtol=rtol, atol=atol, msg=f"grad of input {i}")
    return grads_m
