"""Learning rules: which matrix carries the error down in delta[i] = (delta[i+1] W[i+1]) * g'(z[i]).

The slides send the error down through the forward weights W ("note the use of W"). A learning
rule replaces that one matrix and nothing else; the weight gradient stays delta^T a_prev:

    backprop                   grad_a_prev = delta W          (the slides)
    feedback_alignment         grad_a_prev = delta B          B fixed, random, shaped like W
    sign_symmetry              grad_a_prev = delta B          B = sign(W) * s, from W each step
    kolen_pollack              grad_a_prev = delta B          B random at first, then stepped by the
                                                              optimizer with W's gradient, so with
                                                              weight decay B -> W
    direct_feedback_alignment  delta[i] = (delta[L] D[i]) * g'(z[i])   for every hidden layer i,
                                                              D[i] fixed, random, (n_L, n_i)

Sign symmetry is the uSF variant of Liao, Leibo & Poggio (2016): every entry of B has the same
magnitude s. Ours is fixed when the layer is initialised, s = rms(W) = ||W||_F / sqrt(n_out n_in)
of the initial W (so ||B||_F = ||W||_F then), rather than 1: without batch normalisation a
magnitude of 1 scales the error by about 1/rms(W) per layer and training diverges. s lives in the
`feedback` buffer itself (every entry is +-s), so it is saved, loaded and moved with it.

Each layer that needs one holds its matrix as `feedback`: a buffer (feedback alignment, sign
symmetry, DFA) or, for Kolen-Pollack, a Parameter, because its update is the optimizer's (the
same step as W, weight decay included); its gradient is W's, delta^T a_prev.
"""

import math
import weakref
from sys import getrefcount

import torch
from torch import Tensor, nn

RULES = ("backprop", "feedback_alignment", "sign_symmetry", "kolen_pollack",
         "direct_feedback_alignment")
ALIASES = {"bp": "backprop", "fa": "feedback_alignment", "ss": "sign_symmetry",
           "usf": "sign_symmetry", "kp": "kolen_pollack", "dfa": "direct_feedback_alignment"}
DFA = "direct_feedback_alignment"
DIRECT, PER_LAYER = "direct", "per_layer"  # where the hidden layers' error comes from


def check_rule(rule: object, where: str) -> str:
    """The canonical name of rule (a name in RULES or an alias), else a ValueError naming them."""
    name = ALIASES.get(rule, rule) if isinstance(rule, str) else rule
    if name not in RULES:
        aliases = ", ".join(f"{a}={n}" for a, n in ALIASES.items())
        raise ValueError(
            f"{where}: unknown rule {rule!r}; expected one of {', '.join(RULES)} "
            f"(aliases {aliases})"
        )
    return name


def draw_like_linear(shape, fan_in: int, like: Tensor) -> Tensor:
    """A random matrix drawn as nn.Linear draws its weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    B = torch.empty(shape, device=like.device, dtype=like.dtype)
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return nn.init.uniform_(B, -bound, bound)


def sign_feedback(W: Tensor, scale: Tensor | None = None) -> Tensor:
    """uSF: B = sign(W) * scale (default rms(W)), outside any graph (B is no function of W for
    autograd).

    One pass over W: copysign, so an exactly zero weight sends +-scale by the sign bit of its
    zero rather than 0, and every entry of B is +-scale.
    """
    W = W.detach()
    if scale is None:
        scale = W.square().mean().sqrt()
    return torch.copysign(scale.to(W.dtype) if isinstance(scale, Tensor) else
                          torch.tensor(scale, dtype=W.dtype, device=W.device), W)


def sign_scale(B: Tensor) -> Tensor:
    """s of a sign-symmetry feedback matrix, whose every entry is +-s: one element read."""
    return B.reshape(-1)[0].abs() if B.numel() else B.new_zeros(())


def attach(layer: nn.Linear, rule: str, n_L: int | None = None) -> None:
    """Give layer what rule needs: `rule` and, where it needs one, `feedback`, drawn now from the
    torch seed (after W and b, which are left as they are).

    n_L: for DFA, the network's output width (hidden layers' D is (n_L, n_out)); None marks the
    output layer, which needs no D.
    """
    layer.rule = rule
    W = layer.weight
    n_out, n_in = W.shape
    if rule in ("feedback_alignment", "kolen_pollack"):
        B = draw_like_linear((n_out, n_in), n_in, W.detach())
        if rule == "kolen_pollack":
            layer.feedback = nn.Parameter(B)
        else:
            layer.register_buffer("feedback", B)
    elif rule == "sign_symmetry":
        layer.register_buffer("feedback", sign_feedback(W))
    elif rule == DFA and n_L is not None:
        layer.register_buffer("feedback", draw_like_linear((n_L, n_out), n_out, W.detach()))


def redraw(layer: nn.Module, init: str) -> None:
    """Draw a random `feedback` again as W was drawn ("he": normal, std sqrt(2 / fan_in);
    "xavier": normal, std sqrt(2 / (fan_in + fan_out))); sign symmetry's is made again from the
    new W (its magnitude s = rms(W) with it).

    fan_in is the matrix's second dimension, the width the error it carries lands in: n_in for
    FA's and KP's B (W's shape), n_i for DFA's D[i] (n_L, n_i). So DFA's D is drawn as FA's B
    would be in that shape: the last hidden layer's D and FA's output-layer B are alike (with
    one hidden layer DFA is FA), and under "he" DFA's delta[i] starts at about backprop's size. On
    MNIST-1D other draws of D move DFA's accuracy by several points (benchmarks/dfa_feedback.py
    and README.md's learning-rules section give the figures).
    """
    B = getattr(layer, "feedback", None)
    if B is None:
        return
    with torch.no_grad():
        if layer.rule == "sign_symmetry":
            B.copy_(sign_feedback(layer.weight))
        elif init == "he":
            nn.init.kaiming_normal_(B, nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_normal_(B)
        else:
            B.copy_(draw_like_linear(B.shape, B.shape[1], B))


def feedback_of(layer: nn.Module) -> Tensor | None:
    """The matrix layer's error goes down through this step: None for backprop (W itself).

    Sign symmetry's B is sign(current W) * s, s fixed at initialisation: every entry of the
    `feedback` buffer is +-s, so copysign(feedback, W) is that B in one kernel (bit for bit
    sign_feedback(W, sign_scale(feedback)), without reading s out first). A plain eager
    float32/float64 call on the C++ core takes its sign_feedback instead: the same bits from one
    bit operation per entry that reads W only and s from feedback[0] (ATen's copysign costs about
    twice as much). In eager mode the buffer then shows the B of the latest forward: rebound to
    the new B, or, on the C++ core where nothing but the layer holds it, written over (an earlier
    forward's graph that saved the old B, or a caller who kept it, keeps it unchanged).
    """
    rule = layer.rule
    if rule == "backprop":
        return None
    if rule == "sign_symmetry":
        return _sign_feedback(layer)
    # read directly: nn.Module.__getattr__ costs ~0.5 us a read, a step pays it per layer
    B = (layer._parameters if rule == "kolen_pollack" else layer._buffers).get("feedback")
    return B if B is not None else layer.feedback


_eager = None  # manualbp.native.eager, bound on first use (manualbp.native imports this module)
_SEEN = weakref.WeakKeyDictionary()  # layer -> (weakref to its last B, B's version then)
_SOLE = None  # sys.getrefcount of a tensor only a dict holds, read as _sign_feedback reads it


def _refs(buffers: dict) -> int:
    buf = buffers["feedback"]  # as _sign_feedback reads it
    return getrefcount(buf)


def _sign_feedback(layer: nn.Module) -> Tensor:
    """feedback_of for sign symmetry. On the C++ core the buffer is written over where nothing
    but the layer holds it (no graph saved it, no one kept it): fresh memory each step costs page
    faults as well as the pass."""
    buffers = layer._buffers
    W = layer._parameters.get("weight")
    if W is None:  # a parametrization's property
        W = layer.weight
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return torch.copysign(buffers["feedback"], W.detach())  # traced: the buffer stays
    global _eager, _SOLE
    if _eager is None:
        from manualbp.native import eager as _eager
        _SOLE = _refs({"feedback": torch.empty(0)})
    buf = buffers["feedback"]
    sole = getrefcount(buf) <= _SOLE  # no one else holds buf (not even an argument list)
    lib = _eager(W)
    B = None if lib is None or not _uniform(layer, buf) else lib.sign_feedback(W, buf, sole)
    if B is None:  # not served there: the reference line
        B = torch.copysign(buf, W.detach())
    buffers["feedback"] = B
    _SEEN[layer] = (weakref.ref(B), B._version)
    return B


def _uniform(layer: nn.Module, buf: Tensor) -> bool:
    """Whether every entry of buf is +-s (s = |buf[0]|), as the C++ sign_feedback assumes.

    True without a look at the data when buf is the tensor _sign_feedback last returned, at the
    version it had then (attach, redraw and the C++ write keep the form). A buffer loaded or
    written by other code (load_state_dict, a hand edit) is read once; if its magnitudes differ
    the reference line copysign(feedback, W) serves it, entry by entry, on every backend.
    """
    seen = _SEEN.get(layer)
    if seen is not None and seen[0]() is buf and seen[1] == buf._version:
        return True
    if buf.numel() == 0:
        return True
    flat = buf.detach().reshape(-1)
    return bool((flat.abs() == flat[0].abs()).all())


def split(L: int, params: tuple):
    """(W1, b1, ..., WL, bL), feedback, source from a fused Function's trailing arguments.

    A rule appends its L feedback matrices (None where a layer has none) and the source, DIRECT
    or PER_LAYER, after the 2L parameters; backprop appends nothing (feedback and source None).
    """
    if len(params) == 2 * L:
        return params, None, None
    return params[:2 * L], params[2 * L:-1], params[-1]
