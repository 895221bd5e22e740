"""Learning rules inside mb.per_example: norms and clipped gradients read off the rule's delta.

Reference: each example's gradient under the same rule, from its own loss and its own backward
(batch of one), in float64. The rules themselves are held to straight-through autograd in
test_rules.py, so this checks only that the per-example probe and the rule compose.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manualbp as mb


def _mlp(rule):
    return mb.MLP([5, 7, 6, 3], activation="tanh", rule=rule).double()


def _converted(rule):
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    return mb.convert(net.double(), rule=rule)


PATHS = {  # name: (build(rule), one step's backward)
    "mlp.loss": (_mlp, lambda m, x, y: m.loss(x, y)[0].backward()),
    "mlp(x)": (_mlp, lambda m, x, y: mb.softmax_cross_entropy(m(x), y).backward()),
    "mlp.backprop": (_mlp, lambda m, x, y: m.backprop(x, y)),
    "convert": (_converted, lambda m, x, y: F.cross_entropy(m(x), y).backward()),
}
CASES = [(rule, path) for rule in ("feedback_alignment", "sign_symmetry", "kolen_pollack",
                                   "direct_feedback_alignment")
         for path in PATHS if not (rule == "direct_feedback_alignment" and path == "convert")]


def _covered(model):
    return {k: p for k, p in model.named_parameters() if not k.endswith("feedback")}


def _per_example_grads(model, x, y, step):
    grads = []
    for n in range(x.shape[0]):
        model.zero_grad()
        step(model, x[n:n + 1], y[n:n + 1])
        grads.append({k: p.grad.clone() for k, p in _covered(model).items()})
    model.zero_grad()
    return grads


@pytest.mark.parametrize("rule, path", CASES)
def test_rule_norms_and_clipping_match_per_example_reference(rule, path):
    build, step = PATHS[path]
    torch.manual_seed(1)
    model = build(rule)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    ref = _per_example_grads(model, x, y, step)
    ref_norms = torch.stack([sum((g ** 2).sum() for g in d.values()) for d in ref]).sqrt()

    with mb.per_example(model, reduction="mean") as pe:
        step(model, x, y)
    torch.testing.assert_close(pe.norms, ref_norms, rtol=1e-10, atol=0)

    model.zero_grad()
    if rule == "kolen_pollack":  # B is a trainable Parameter no layer's probe clips: refused
        with pytest.raises(ValueError, match=r"max_norm clips only .*feedback"):
            mb.per_example(model, max_norm=1.0)
        return
    C = ref_norms.median().item()  # some examples clipped, some not
    with mb.per_example(model, reduction="mean", max_norm=C):
        step(model, x, y)
    c = (C / (ref_norms + 1e-6)).clamp(max=1)
    assert (c < 1).any() and (c == 1).any()
    for k, p in _covered(model).items():
        expected = sum(c[n] * ref[n][k] for n in range(len(ref))) / len(ref)
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-13)
