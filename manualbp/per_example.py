"""Each example's gradient norm, and DP-SGD's clipped gradient, from the one backward pass.

At every layer the backward holds a_prev and delta, and example n's share of grad_W is
delta_n^T a_prev_n. For 2-D inputs its squared norm is ||delta_n||^2 ||a_prev_n||^2 (plus
||delta_n||^2 for the bias): no per-example gradient is ever formed. With inputs (B, T, d) an
example is a slice along dim 0 and

    ||G_n||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s)     (Gram form, cost B T^2 (n_in + n_out))
              = ||delta_n^T a_n||_F^2                        (outer form, cost B T n_in n_out)

whichever is cheaper for the layer. DP-SGD clips with c_n = min(1, C / (||g_n|| + 1e-6)), a
coefficient over all layers at once: each covered layer's probe keeps (a_prev, delta) from the
backward, and when the block exits grad_W = (c * delta)^T a_prev is the one GEMM the backward
would have done for that layer (it skipped it). A layer called twice adds its second call's rows
to each example's gradient, so reused modules are exact too.
"""

import torch
from torch import Tensor, nn

from manualbp.apply import tracing

_ACTIVE: list = []  # the open per_example block, if any (one at a time)
_EPS = 1e-6  # DP-SGD's min(1, C / (norm + eps))
REDUCTIONS = ("mean", "sum")


def active():
    """The open PerExample block, or None."""
    return _ACTIVE[0] if _ACTIVE else None


class _Call:
    """One call of a covered layer inside the block; backward fills in its a_prev and delta."""

    __slots__ = ("W", "b", "batch", "clip", "a_prev", "delta")

    def __init__(self, W, b, batch: int, clip: bool) -> None:
        self.W, self.b, self.batch, self.clip = W, b, batch, clip
        self.a_prev = self.delta = None

    def __call__(self, delta: Tensor, a_prev: Tensor | None) -> bool:
        self.delta, self.a_prev = _detached(delta), _detached(a_prev)
        return self.clip  # clipping: the block forms grad_W, grad_b at exit


def _detached(t: Tensor | None) -> Tensor | None:
    return t.detach() if t is not None and t.requires_grad else t  # under create_graph only


class _NodeProbes:
    """The probes of one MLP node's layers (and the caller's Trace), in MLPFunction's trace
    slot."""

    __slots__ = ("probes", "trace")

    def __init__(self, probes, trace=None) -> None:
        self.probes, self.trace = probes, trace


class PerExample:
    """What `with mb.per_example(model, ...) as pe:` gives; see per_example()."""

    def __init__(self, model: nn.Module, reduction: str, max_norm, grads: bool) -> None:
        from manualbp.modules import Linear  # here: modules imports this file

        if not isinstance(model, nn.Module):
            raise TypeError(f"per_example: expected an nn.Module, got {type(model).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"per_example: expected reduction in {REDUCTIONS} (how the loss combines the "
                f"examples of dim 0), got {reduction!r}")
        if max_norm is not None and not (isinstance(max_norm, (int, float))
                                         and not isinstance(max_norm, bool) and max_norm > 0):
            raise ValueError(f"per_example: expected max_norm > 0 or None, got {max_norm!r}")
        self.model, self.reduction, self.grads = model, reduction, grads
        self.max_norm = None if max_norm is None else float(max_norm)
        self.clip = max_norm is not None
        covered: dict[int, nn.Parameter] = {}
        self._layers: set[int] = set()
        for m in model.modules():
            if isinstance(m, Linear):
                self._layers.add(id(m))
                covered.update((id(p), p) for p in (m.weight, m.bias)
                               if p is not None and p.requires_grad)
        names = {}
        self.uncovered: list[str] = []
        for name, p in model.named_parameters():
            if id(p) in covered:
                names[id(p)] = name
            elif p.requires_grad:
                self.uncovered.append(name)
        if self.clip and self.uncovered:
            raise ValueError(
                f"per_example: max_norm clips only parameters of manualbp layers, and these "
                f"trainable ones are not: {', '.join(self.uncovered)}; a clipped gradient that "
                "leaves some unclipped is not DP: convert them, freeze them, or leave max_norm "
                "unset to get norms alone")
        self._names = names  # id(param) -> name, covered params only
        self._params = {i: covered[i] for i in names}
        self._calls: list[_Call] = []
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._no_sync = None
        self.norms: Tensor | None = None
        self._sq: dict[int, tuple] | None = None
        self._by_param: dict[str, Tensor] | None = None
        self._scale = 1.0

    # -- what the layers call while the block is open --------------------------------------
    def probe(self, layer: nn.Module, a_prev: Tensor, W: Tensor, b: Tensor | None,
              traced_ok: bool = False):
        """A probe for this call of layer, or None when the block does not cover it.

        traced_ok: the caller is MLP.backprop, whose one pass torch.compile can trace whole;
        an autograd backward cannot carry the probes' stash through a compiled graph.
        """
        if id(layer) not in self._layers or not isinstance(a_prev, Tensor):
            return None
        if not traced_ok and tracing():
            raise RuntimeError(
                "per_example: torch.compile or torch.func of a model's forward inside the block "
                "is not supported (a compiled backward cannot hand back the per-layer shares); "
                "run it eagerly, or compile an MLP.backprop step, which does it all in one pass")
        W = W if id(W) in self._params else None
        b = b if b is not None and id(b) in self._params else None
        if W is None and b is None:
            return None  # frozen layer
        if a_prev.dim() < 2:
            raise ValueError(
                f"per_example: expected input with a batch dim, shape (B, *, n_in), got "
                f"{tuple(a_prev.shape)}; give it one with x.unsqueeze(0)")
        call = _Call(W, b, a_prev.shape[0], self.clip)
        self._calls.append(call)
        return call

    def node_probes(self, layers, x: Tensor, traced_ok: bool = False):
        """Probes for an MLP node's layers (None if none is covered), in its trace slot."""
        probes = [self.probe(layer, x, layer.weight, layer.bias, traced_ok) for layer in layers]
        return None if all(p is None for p in probes) else _NodeProbes(probes)

    # -- the block ---------------------------------------------------------------------------
    def __enter__(self) -> "PerExample":
        if _ACTIVE:
            raise RuntimeError("per_example: a block is already open; close it before another")
        if self._ddp and self.clip:  # the block averages the clipped gradients itself
            self._no_sync = self.model.no_sync()
            self._no_sync.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, kind, value, tb) -> None:
        _ACTIVE.clear()
        if self._no_sync is not None:
            self._no_sync.__exit__(kind, value, tb)
        if kind is None:
            self._finish()
        self._calls = []

    def _finish(self) -> None:
        calls = [c for c in self._calls if c.delta is not None]
        if not calls:
            if self._calls:
                raise RuntimeError(
                    "per_example: the block ran no backward through its layers; call "
                    "loss.backward() (or model.backprop(x, y)) inside the `with` block")
            raise RuntimeError(
                "per_example: no layer the block covers ran inside it; run the model's forward "
                "and backward inside the `with` block")
        batch = calls[0].batch
        if any(c.batch != batch for c in calls):
            got = sorted({c.batch for c in calls})
            raise ValueError(
                f"per_example: expected every layer to see the same batch (dim 0), got sizes "
                f"{got}; one batch per block")
        shares = _group(calls, batch)
        for c in self._calls:  # the shares hold what is still needed; drop the rest
            c.delta = c.a_prev = None
        del calls
        total, parts = _sq_norms(shares)
        self._scale = float(batch) if self.reduction == "mean" else 1.0  # g_n = scale * share
        self._sq, self._by_param = parts, None
        self.norms = total.sqrt().mul_(self._scale)
        if self.grads:
            for p, kind, D, A in shares.values():
                D3 = D.reshape(batch, -1, D.shape[-1])
                g = torch.bmm(D3.transpose(1, 2), A.reshape(batch, -1, A.shape[-1])) \
                    if kind == "W" else D3.sum(1)
                p.grad_sample = g * self._scale  # (B, *p.shape): example n's own gradient
        if self.clip:
            _clipped(shares, self.norms, self.max_norm, self._ddp)

    @property
    def norms_by_param(self) -> dict[str, Tensor]:
        """{parameter name: (B,)} each example's gradient norm for that parameter alone."""
        if self._by_param is None:
            self._by_param = {self._names[key]: (t.sqrt() if squared else t.abs()) * self._scale
                              for key, (t, squared) in (self._sq or {}).items()}
        return self._by_param


def _group(calls, batch):
    """id(param) -> (param, "W" or "b", D, A or None). A parameter with one 2-D call keeps
    D (B, n_out) and A (B, n_in); otherwise D is (B, T, n_out) and A (B, T, n_in), every call of
    the same parameter stacked along T (a reused layer adds rows to each example)."""
    parts: dict[int, tuple] = {}
    for c in calls:
        if c.W is not None:
            parts.setdefault(id(c.W), (c.W, "W", [], []))[2].append(c)
        if c.b is not None:
            parts.setdefault(id(c.b), (c.b, "b", [], []))[2].append(c)
    out = {}
    for key, (p, kind, cs, _) in parts.items():
        if len(cs) == 1 and cs[0].delta.dim() == 2 and cs[0].delta.shape[0] == batch:
            D, A = cs[0].delta, cs[0].a_prev
        else:
            D = torch.cat([c.delta.reshape(batch, -1, c.delta.shape[-1]) for c in cs], 1)
            A = torch.cat([c.a_prev.reshape(batch, -1, c.a_prev.shape[-1]) for c in cs], 1) \
                if kind == "W" else None
        out[key] = (p, kind, D, A if kind == "W" else None)
    return out


def _sq_norms(shares) -> tuple[Tensor, dict[int, tuple]]:
    """(B,) the total squared norm of each example's share, and per parameter how to get its
    own: (t,) for ||t_n||^2. For a 2-D layer ||delta_n a_n^T|| = ||delta_n|| ||a_n||, so two
    row norms serve both W and b."""
    rows: dict[int, Tensor] = {}  # id(delta) -> ||delta_n||, shared by a layer's W and b
    parts, total = {}, None
    for key, (_, kind, D, A) in shares.items():
        if D.dim() == 2:
            d = rows.get(id(D))
            if d is None:
                d = rows[id(D)] = torch.linalg.vector_norm(D, dim=1)
            t = d * torch.linalg.vector_norm(A, dim=1) if kind == "W" else d
            total = t * t if total is None else total.addcmul_(t, t)
            parts[key] = (t, False)
        else:
            sq = _sq_norm(D, A) if kind == "W" else D.sum(1).square().sum(1)
            total = sq.clone() if total is None else total.add_(sq)
            parts[key] = (sq, True)
    return total, parts


def _clipped(shares, norms: Tensor, max_norm: float, ddp: bool) -> None:
    """Add sum_n c_n delta_n^T a_n, c_n = min(1, C / (norm_n + 1e-6)), to each p.grad: each
    example's delta re-weighted before the one GEMM the backward skipped. Last layer first,
    each share freed once used, so the widest gradients are formed with the least held."""
    c = (max_norm / (norms + _EPS)).clamp_(max=1.0)
    weighted: dict[int, tuple] = {}  # id(delta) -> (delta, c * delta), for a layer's b and W
    for key in reversed(list(shares)):
        p, kind, D, A = shares.pop(key)
        _, rows = weighted.pop(id(D), (None, None))
        if rows is None:
            cd = c.to(D.dtype)
            rows = (D * (cd[:, None] if D.dim() == 2 else cd[:, None, None])).reshape(
                -1, D.shape[-1])  # (B T, n_out)
            if kind == "b":  # its W comes next; D held so that its id stays its own
                weighted[id(D)] = (D, rows)
        del D
        g = rows.t().mm(A if A.dim() == 2 else A.reshape(-1, A.shape[-1])) if kind == "W" \
            else rows.sum(0)
        del rows, A
        _accumulate(p, g, ddp)


def _sq_norm(D: Tensor, A: Tensor) -> Tensor:
    """||D_n^T A_n||_F^2 per example, D (B, T, n_out), A (B, T, n_in), by the cheaper form."""
    T, n_out, n_in = D.shape[1], D.shape[2], A.shape[2]
    if T == 1:
        return D.square().sum((1, 2)) * A.square().sum((1, 2))
    if T * (n_in + n_out) <= n_in * n_out:  # Gram: sum_{t,s} (a_t . a_s)(delta_t . delta_s)
        return (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(D, D.transpose(1, 2))).sum((1, 2))
    return torch.bmm(D.transpose(1, 2), A).square().sum((1, 2))


def _accumulate(p: Tensor, g: Tensor, ddp: bool) -> None:
    """Add the clipped gradient g to p.grad as backward would (averaged over ranks under DDP)."""
    if ddp:
        import torch.distributed as dist

        dist.all_reduce(g)
        g = g / dist.get_world_size()
    g = g.to(p.dtype).contiguous()
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def per_example(model: nn.Module, reduction: str = "mean", max_norm: float | None = None,
                grads: bool = False) -> PerExample:
    """A block in which backward also gives each example's gradient norm (and DP-SGD clipping).

        with mb.per_example(model, reduction="mean", max_norm=None) as pe:
            loss = loss_fn(model(x), y)   # a mean (or sum) over dim 0 of x
            loss.backward()               # or model.backprop(x, y) for an mb.MLP
        pe.norms                          # (B,)

    Covers the parameters of every manualbp layer in model (mb.Linear, mb.MLP, a model after
    mb.convert), on every path: per-layer Functions, the MLP node, MLP.backprop. One batch
    per block, one block at a time. Under DistributedDataParallel with max_norm, each rank
    clips its own examples and the block averages the clipped gradients over the ranks.

    Args:
        model: the module whose manualbp layers the block covers.
        reduction: "mean" or "sum": how the loss combines the examples along dim 0 (so that g_n
            is example n's gradient of its own loss term). Default "mean".
        max_norm: C. If set, when the block exits each covered parameter's .grad has added to
            it the mean (or sum) over n of min(1, C / (norm_n + 1e-6)) g_n, and that backward
            gives it nothing else. Refused if model has trainable parameters no manualbp layer
            owns. Default None (norms only; .grad as a plain backward gives it).
        grads: also set p.grad_sample (B, *p.shape) = g_n for each covered p. Default False.

    Attributes (set when the block exits):
        norms: (B,) each example's gradient norm over every covered parameter.
        norms_by_param: {parameter name: (B,)}.
        uncovered: names of trainable parameters that no manualbp layer owns (not in norms).
    """
    return PerExample(model, reduction, max_norm, grads)
