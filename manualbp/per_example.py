"""Each example's gradient norm, and DP-SGD's clipped gradient, from the one backward pass.

At every layer the backward holds a_prev and delta, and example n's share of grad_W is
delta_n^T a_prev_n. For 2-D inputs its squared norm is ||delta_n||^2 ||a_prev_n||^2 (plus
||delta_n||^2 for the bias): no per-example gradient is ever formed. With inputs (B, T, d) an
example is a slice along dim 0 and

    ||G_n||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s)     (Gram form, cost B T^2 (n_in + n_out))
              = ||delta_n^T a_n||_F^2                        (outer form, cost B T n_in n_out)

whichever is cheaper for the layer, formed in that layer's backward while delta and a_prev are
in cache (in a block of norms alone the layer then lets them go, as a plain backward does).
DP-SGD clips with c_n = min(1, C / (||g_n|| + 1e-6)), a
coefficient over all layers at once: each covered layer's probe keeps (a_prev, delta) from the
backward, and when the block exits grad_W = (c * delta)^T a_prev is the one GEMM the backward
would have done for that layer (it skipped it). A layer called twice adds its second call's rows
to each example's gradient, so reused modules are exact too.
"""

import weakref

import torch
from torch import Tensor, nn

from manualbp import native, per_example_norms
from manualbp.apply import tracing
from manualbp.per_example_norms import _key, accumulate, clipped, group, part_sq, sq_norms

_ACTIVE: list = []  # the open per_example block, if any (one at a time)
_norm = torch.linalg.vector_norm
REDUCTIONS = ("mean", "sum")
_clipped, _accumulate = clipped, accumulate  # globals here: a test swaps in a broken clip
_COVERAGE: "weakref.WeakKeyDictionary[nn.Module, _Coverage]" = weakref.WeakKeyDictionary()


def active():
    """The open PerExample block, or None."""
    return _ACTIVE[0] if _ACTIVE else None


class _Call:
    """One call of a covered layer inside the block; backward fills in its a_prev and delta,
    and for a (B, T, n) share its part of the norm (sq, dsum: per_example_norms.early). drop:
    once that part is formed, nothing else will read delta and a_prev (norms alone, a layer
    called once), so they are let go in backward, as a plain backward frees them (dropped)."""

    __slots__ = ("W", "b", "batch", "clip", "a_prev", "delta", "rows", "native", "rows_now",
                 "grams", "sq", "dsum", "drop", "dropped", "twice")

    def __init__(self, W, b, batch: int, clip: bool, rows_now: bool, grams: dict,
                 drop: bool) -> None:
        self.W, self.b, self.batch, self.clip = W, b, batch, clip
        self.rows_now = rows_now  # take 2-D row norms in backward (else the C++ finish does)
        self.grams = grams  # the block's A A^T by _key(A) (q, k, v read one input), or None
        self.a_prev = self.delta = self.rows = self.native = self.sq = self.dsum = None
        self.drop, self.dropped = drop, False
        self.twice = False  # a second backward reached this call: the block refuses it

    def keep(self) -> None:
        """Keep delta and a_prev after all: another call of the layer stacks with this one."""
        self.drop = False
        if self.native is not None and self.native.keep_slot(id(self)):
            self.dropped = True
        if self.dropped:
            raise RuntimeError(
                "per_example: a layer ran again after its backward inside a norms block, so "
                "its calls cannot be stacked; run every forward before the backward, or one "
                "forward and backward per block")

    @property
    def filled(self) -> bool:
        """Whether a backward reached this call."""
        return self.delta is not None or self.dropped

    def slot(self, lib) -> int:
        """This call's slot in the C++ core, for a native node's backward to fill with
        (delta, a_prev, sq, dsum) in place of calling the probe; opened now, taken by
        harvest()."""
        self.native = lib
        lib.open_slot(id(self), self.batch, self.W is not None, self.b is not None, self.drop)
        return id(self)

    def harvest(self) -> None:
        """Take a native node's (delta, a_prev, sq, dsum) from this call's slot (closing it),
        as though layer_grads had called the probe."""
        lib, self.native = self.native, None
        if lib is not None:
            (delta, a_prev, sq, dsum), twice = lib.take_slot(id(self))
            self.twice = self.twice or twice
            if delta is not None:
                self.delta, self.a_prev = _detached(delta), _detached(a_prev)
            self.dropped = delta is None and (sq is not None or dsum is not None)
            self.sq, self.dsum = sq, dsum

    def __call__(self, delta: Tensor, a_prev: Tensor | None) -> bool:
        self.twice = self.twice or self.filled  # one forward, a second backward
        self.delta, self.a_prev = delta, a_prev = _detached(delta), _detached(a_prev)
        D, A = per_example_norms.share(delta, a_prev, self.batch)
        if D.dim() == 3:  # (B, T, n): its part of the norm now, while D and A are in cache
            self.sq, self.dsum = per_example_norms.early(D, A, self.W is not None,
                                                         self.b is not None, self.grams)
            if self.drop:
                self.delta = self.a_prev = None
                self.dropped = True
        elif self.rows_now:  # 2-D: the row norms now, while delta and a_prev are in cache
            self.rows = (_norm(delta, dim=1), None if self.W is None else _norm(a_prev, dim=1))
        return self.clip  # clipping: the block forms grad_W, grad_b at exit


def _detached(t: Tensor | None) -> Tensor | None:
    return t.detach() if t is not None and t.requires_grad else t  # under create_graph only


class _NodeProbes:
    """The probes of one MLP node's layers (and the caller's Trace), in MLPFunction's trace
    slot."""

    __slots__ = ("probes", "trace")

    def __init__(self, probes, trace=None) -> None:
        self.probes, self.trace = probes, trace


class _Coverage:
    """Which layers and parameters of a model a block covers, cached per model between blocks
    (walking named_parameters() each step costs a small model's step a tenth of its time).

    Valid while the model's signature is unchanged: every module, its class (convert swaps it
    in place), every parameter and its requires_grad. It holds the parameters and classes so
    that their ids cannot be reused by new objects while it is cached.
    """

    __slots__ = ("signature", "held", "layers", "names", "params", "uncovered")

    def __init__(self, model: nn.Module, signature: list, held: list) -> None:
        from manualbp.modules import Linear  # here: modules imports this file

        self.signature, self.held = signature, held
        covered: dict[int, nn.Parameter] = {}
        self.layers: set[int] = set()
        for m in model.modules():
            if isinstance(m, Linear):
                self.layers.add(id(m))
                covered.update((id(p), p) for p in (m.weight, m.bias)
                               if p is not None and p.requires_grad)
        self.names: dict[int, str] = {}  # id(param) -> name, covered params only
        self.uncovered: list[str] = []
        for name, p in model.named_parameters():
            if id(p) in covered:
                self.names[id(p)] = name
            elif p.requires_grad:
                self.uncovered.append(name)
        self.params = {i: covered[i] for i in self.names}


def _signature(model: nn.Module) -> tuple[list, list]:
    """(what coverage depends on, the objects whose ids it names), by a plain walk of the
    module tree: ids of every module and its class, every parameter and its requires_grad."""
    signature, held, stack = [], [], [model]
    while stack:
        m = stack.pop()
        if m is None:  # a submodule slot registered as None
            signature.append(None)
            continue
        cls = type(m)
        signature += (id(m), id(cls))
        held.append(cls)
        for p in m._parameters.values():
            if p is None:
                signature.append(None)
            else:
                signature += (id(p), p.requires_grad)
                held.append(p)
        stack.extend(m._modules.values())
    return signature, held


def coverage(model: nn.Module) -> _Coverage:
    """model's _Coverage, from the cache while its signature holds."""
    signature, held = _signature(model)
    cached = _COVERAGE.get(model)
    if cached is not None and cached.signature == signature:
        return cached
    cached = _COVERAGE[model] = _Coverage(model, signature, held)
    return cached


class PerExample:
    """What `with mb.per_example(model, ...) as pe:` gives; see per_example()."""

    def __init__(self, model: nn.Module, reduction: str, max_norm, grads: bool) -> None:
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
        cover = coverage(model)
        self._layers, self._names, self._params = cover.layers, cover.names, cover.params
        self.uncovered: list[str] = list(cover.uncovered)
        if self.clip and self.uncovered:
            raise ValueError(
                f"per_example: max_norm clips only parameters of manualbp layers, and these "
                f"trainable ones are not: {', '.join(self.uncovered)}; a clipped gradient that "
                "leaves some unclipped is not DP: convert them, freeze them, or leave max_norm "
                "unset to get norms alone")
        self._grads_before = None  # (p, p.grad, its version) at __enter__
        self._calls: list[_Call] = []
        self._grams: dict = {}  # _key(A) -> (A A^T, A) formed in backward (norms' early()),
        # for one pass: the calls of the next forward get a new dict
        self._drop = not self.clip and not grads  # whether a call may let its share go early
        self._seen: dict[int, _Call] = {}  # id(param) -> its first call (while _drop)
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._no_sync = None
        self.norms: Tensor | None = None
        self._sq: dict[int, tuple] | None = None
        self._by_param: dict[str, Tensor] | None = None
        self._scale = 1.0
        # the C++ finish (_native_finish) where it can run: it takes the row norms itself, so
        # the probes need not (grads=True, DDP and a traced step keep to the Python finish)
        self._lib = None if self.grads or self._ddp or tracing() else native.lib()

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
        if self._grams:  # a forward after a backward: a new pass, whose inputs may sit in the
            self._grams = {}  # memory of the last one's (a buffer written over in place)
        grams = None if traced_ok and tracing() else self._grams  # _key reads data_ptr()
        call = _Call(W, b, a_prev.shape[0], self.clip, self._lib is None, grams, self._drop)
        for p in (W, b):
            if p is not None and self._drop:
                first = self._seen.setdefault(id(p), call)
                if first is not call:  # a reused layer: its calls stack, each keeps its share
                    call.drop = False
                    first.keep()
        self._calls.append(call)
        return call

    def node_probes(self, layers, x: Tensor, traced_ok: bool = False):
        """Probes for an MLP node's layers (None if none is covered), in its trace slot."""
        probes = []
        for layer in layers:  # the weight and bias as layer.weight reads them, without
            own = layer._parameters  # nn.Module.__getattr__ (a parametrization's are not here)
            W = own["weight"] if "weight" in own else layer.weight
            b = own["bias"] if "bias" in own else layer.bias
            probes.append(self.probe(layer, x, W, b, traced_ok))
        return None if all(p is None for p in probes) else _NodeProbes(probes)

    # -- the block ---------------------------------------------------------------------------
    def __enter__(self) -> "PerExample":
        if _ACTIVE:
            raise RuntimeError("per_example: a block is already open; close it before another")
        if self._ddp and self.clip:  # the block averages the clipped gradients itself
            self._no_sync = self.model.no_sync()
            self._no_sync.__enter__()
        _ACTIVE.append(self)
        # what each covered .grad is now, to see at exit a gradient that reached a covered
        # parameter some other way than its layer's backward (with max_norm, whose layers' add
        # nothing to .grad, any; else one whose layer's backward never reached the block)
        self._grads_before = [(p, p.grad, -1 if p.grad is None else p.grad._version)
                              for p in self._params.values()]
        return self

    def __exit__(self, kind, value, tb) -> None:
        _ACTIVE.clear()
        for call in self._calls:  # a native node's shares (and its slot closed, whatever befell)
            call.harvest()
        if self._no_sync is not None:
            self._no_sync.__exit__(kind, value, tb)
        if kind is None:
            self._check_unseen()
            self._finish()
        self._calls, self._grams, self._seen = [], {}, {}

    def _check_unseen(self) -> None:
        """Refuse a covered parameter whose .grad changed inside the block by a way the block did
        not see (a Linear subclass whose forward does not run manualbp's, the weight used
        outside its layer): with max_norm, where the covered layers' backward gives .grad
        nothing, any change (it would stay unclipped); without, a change to a parameter no
        backward of its layer reached (the norms would leave it out)."""
        grads, self._grads_before = self._grads_before, None
        seen = set()
        if not self.clip:
            for c in self._calls:
                if c.filled:
                    seen.update(id(t) for t in (c.W, c.b) if t is not None)
        for p, before, version in grads:
            g = p.grad
            if id(p) not in seen and g is not None and (g is not before
                                                         or g._version != version):
                what = ("max_norm cannot clip it; call the layer itself (mb.Linear.forward), or "
                        "leave max_norm unset to get norms alone") if self.clip else (
                        "the norms would leave it out; call the layer itself (mb.Linear.forward)")
                raise ValueError(
                    f"per_example: {self._names[id(p)]} received a gradient inside the block "
                    "that did not come through its manualbp layer's backward (a Linear subclass "
                    "with a forward of its own, or the parameter used outside its layer), so "
                    f"{what}")

    def _finish(self) -> None:
        if any(c.twice for c in self._calls):  # each call's share holds one backward's delta
            raise RuntimeError(
                "per_example: a layer's forward got two backwards inside the block "
                "(retain_graph=True), so its per-example values would count only one of them; "
                "run one backward per forward in a block (sum the losses, then call backward "
                "once)")
        calls = [c for c in self._calls if c.filled]
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
        self._scale = scale = float(batch) if self.reduction == "mean" else 1.0  # g_n = scale share
        stacked = not self.grads and _stackable(calls)  # the common case
        if self._lib is not None:  # in one C++ call
            self._native_finish(calls, batch, scale, stacked)
            return
        norms = None
        if stacked:  # a few kernels, no grouping
            norms, S = _stacked_norms(calls)
            self._sq = ([c.W for c in calls], [c.b for c in calls], S)
        shares = group(calls, batch) if norms is None or self.clip else None
        if norms is None:
            known = {}  # _key(t) -> ||t_n||, the row norms the probes took in backward
            for c in calls:
                if c.rows is not None:
                    known[_key(c.delta)] = c.rows[0]
                    if c.rows[1] is not None:
                        known[_key(c.a_prev)] = c.rows[1]
            total, self._sq = sq_norms(shares, known)
            norms = total.sqrt_()
        for c in self._calls:  # the shares hold what is still needed; drop the rest
            c.delta = c.a_prev = c.rows = c.sq = c.dsum = None
        del calls
        self._by_param = None
        self.norms = norms if scale == 1.0 else norms.mul_(scale)
        if self.grads:
            for p, kind, D, A, _ in shares.values():
                D3 = D.reshape(batch, -1, D.shape[-1])
                g = torch.bmm(D3.transpose(1, 2), A.reshape(batch, -1, A.shape[-1])) \
                    if kind == "W" else D3.sum(1)
                p.grad_sample = g * self._scale  # (B, *p.shape): example n's own gradient
        if self.clip:
            _clipped(shares, self.norms, self.max_norm, self._ddp)

    def _native_finish(self, calls, batch: int, scale: float, stacked: bool) -> None:
        """The finish in one C++ call, bit-identical to the Python one: native.finish_rows for
        stacked rows (_stacked_norms, clipped), else native.finish_shares (group, then sq_norms
        and clipped). The lists handed over hold the shares alone (every call's are dropped
        first); the C++ empties them, freeing each share once used."""
        if stacked:  # no rows: the probes left them to this call (rows_now False)
            deltas, a_prevs = [c.delta for c in calls], [c.a_prev for c in calls]
            Ws, bs = [c.W for c in calls], [c.b for c in calls]
        else:
            shares = group(calls, batch)
            keys = list(shares)
            params, kinds, Ds, As, pres = (list(v) for v in zip(*shares.values(), strict=True))
            del shares
        for c in self._calls:
            c.delta = c.a_prev = c.rows = c.sq = c.dsum = None
        self._by_param = None
        if stacked:
            self.norms, S = self._lib.finish_rows(deltas, a_prevs, Ws, bs, bs[0] is not None,
                                                  scale, self.max_norm)
            self._sq = (Ws, bs, S)  # norms_by_param reads them when asked
            return
        self.norms, S, parts = self._lib.finish_shares(params, [k == "W" for k in kinds], Ds,
                                                       As, pres, scale, self.max_norm)
        self._sq = {key: (sq, None, None) if sq is not None else (S, i, None if j < 0 else j)
                    for key, (sq, i, j) in zip(keys, parts, strict=True)}

    @property
    def norms_by_param(self) -> dict[str, Tensor]:
        """{parameter name: (B,)} each example's gradient norm for that parameter alone."""
        if self._by_param is None:
            sq = self._sq or {}
            if isinstance(sq, tuple):  # (Ws, bs, S) from _stacked_norms or finish_rows
                sq = _stacked_parts(*sq)
            self._by_param = {self._names[key]: part_sq(part).sqrt() * self._scale
                              for key, part in sq.items()}
        return self._by_param


def _stackable(calls) -> bool:
    """Whether _stacked_norms serves calls: every call 2-D (B, n), every layer with W (and all
    or none a bias), no parameter called twice."""
    bias = calls[0].b is not None
    batch = calls[0].batch
    for c in calls:
        if c.dropped or c.W is None or (c.b is not None) != bias or c.delta.dim() != 2 \
                or c.delta.shape[0] != batch or c.a_prev.dim() != 2:
            return False
    n = len(calls)
    return len({id(c.W) for c in calls}) == n and (not bias or len({id(c.b) for c in calls}) == n)


def _stacked_norms(calls):
    """(||g_n|| (B,), S) for calls _stackable serves. With S (B, L, 2) holding (||delta_n||,
    ||a_n||) per layer, S[:, :, 1] *= S[:, :, 0] leaves what the norm over both takes:
    ||g_n||^2 = sum of squares. native.finish_rows is this and clipped() in C++."""
    S = torch.stack([t for c in calls for t in (c.rows or (_norm(c.delta, dim=1),
                                                           _norm(c.a_prev, dim=1)))], 1)
    S = S.view(S.shape[0], len(calls), 2)  # (B, L, 2)
    S[:, :, 1].mul_(S[:, :, 0])  # ||delta_n a_n^T|| = ||delta_n|| ||a_n||
    norms = _norm(S.view(S.shape[0], -1), dim=1) if calls[0].b is not None \
        else _norm(S[:, :, 1], dim=1)
    return norms, S


def _stacked_parts(Ws, bs, S) -> dict:
    """What norms_by_param reads for each parameter from _stacked_norms' S (B, L, 2)."""
    parts = {id(W): (S, (slice(None), k, 1), None) for k, W in enumerate(Ws)}
    if bs[0] is not None:
        parts.update({id(b): (S, (slice(None), k, 0), None) for k, b in enumerate(bs)})
    return parts


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
