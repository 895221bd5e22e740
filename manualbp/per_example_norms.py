"""The arithmetic of manualbp.per_example: each example's squared gradient norm from the layers'
(a_prev, delta) shares, and DP-SGD's clipped gradient from them.

For a 2-D layer ||delta_n a_n^T||^2 = ||delta_n||^2 ||a_n||^2, so every 2-D layer's norms come
from one row norm per distinct tensor (a layer's W and b share its delta; layers fed the same
input share its rows), stacked and combined in a handful of kernels: in a small step the
kernels' fixed cost is what counts. Inputs (B, T, n_in) take the Gram or outer form (_sq_norm).
"""

import torch
from torch import Tensor

_EPS = 1e-6  # DP-SGD's min(1, C / (norm + eps))
_norm = torch.linalg.vector_norm


def share(delta: Tensor, a_prev: Tensor | None, batch: int) -> tuple:
    """(D, A): one call's delta and a_prev as group keeps them, 2-D (B, n) or (B, T, n) (a
    delta of more than 3 dims, or not B rows, as a node's (B T, n) rows are, is one T)."""
    if delta.dim() > 3 or delta.shape[0] != batch:
        delta = delta.reshape(batch, -1, delta.shape[-1])
        a_prev = None if a_prev is None else a_prev.reshape(batch, -1, a_prev.shape[-1])
    return delta, a_prev


def early(D: Tensor, A: Tensor | None, W: bool, b: bool, grams: dict) -> tuple:
    """(sq, dsum) of a (B, T, n) share (from share()) in backward, while D and A are in cache:
    sq = ||D_n^T A_n||^2 (B,) where W is covered, dsum = sum_t D_t (B, n) where b is (None
    elsewhere); the native slots form the same (per_example.cpp's early_share)."""
    sq = _sq_norm(D, A, grams) if W and A is not None else None
    return sq, D.sum(1) if b else None


def group(calls, batch):
    """id(param) -> (param, "W" or "b", D, A or None, pre). A parameter with one call keeps its
    delta D (B, *, n_out) and a_prev A (B, *, n_in) as share() makes them (D, A 2-D or
    (B, T, n)), and pre: what its probe formed in backward (early(): sq for a W, dsum for a b),
    or None (D and A are None where the call let them go: only pre is read); a parameter called
    more than once has every call stacked along T (a reused layer adds rows to each example),
    and no pre."""
    parts: dict[int, tuple] = {}
    for c in calls:
        if c.W is not None:
            parts.setdefault(id(c.W), (c.W, "W", []))[2].append(c)
        if c.b is not None:
            parts.setdefault(id(c.b), (c.b, "b", []))[2].append(c)
    out = {}
    for key, (p, kind, cs) in parts.items():
        pre = None
        if len(cs) == 1:
            D, A = (None, None) if cs[0].dropped else share(cs[0].delta, cs[0].a_prev, batch)
            pre = cs[0].sq if kind == "W" else cs[0].dsum
        else:
            D = torch.cat([c.delta.reshape(batch, -1, c.delta.shape[-1]) for c in cs], 1)
            A = torch.cat([c.a_prev.reshape(batch, -1, c.a_prev.shape[-1]) for c in cs], 1) \
                if kind == "W" else None
        out[key] = (p, kind, D, A if kind == "W" else None, pre)
    return out


def _key(t: Tensor) -> tuple:
    """Which values t holds: two live views with the same memory, shape and strides are equal
    (autograd hands each layer its own Python object for a shared input)."""
    return t.data_ptr(), t.dtype, t.shape, t.stride()


def sq_norms(shares, known=None) -> tuple[Tensor, dict]:
    """(B,) the total squared norm of each example's share, and per parameter what its own is
    made of, for norms_by_param: (S, i, j) for S[i] * S[j] (a 2-D W), (S, i, None) for S[i]
    (a 2-D b), or (sq, None, None) for a (B,) squared norm.
    known: {_key(t): ||t_n||} row norms already taken (the probes take them in backward)."""
    known = known or {}
    rows: dict[tuple, int] = {}  # _key(t) -> index of ||t_n|| in the stack
    norms: list[Tensor] = []  # ||t_n||, t a 2-D delta or a_prev (or a bias's sum over T)
    pairs: list[tuple] = []  # (param key, i, j or None)
    sqs: dict[int, Tensor] = {}  # param key -> (B,) squared norm of a (B, T, n) share
    grams: dict[tuple, tuple] = {}  # _key(A) -> (A A^T, A), shared by layers fed one input

    def row(t: Tensor, shared: bool = True) -> int:  # shared: t is held by shares meanwhile
        k = _key(t) if shared else None
        i = rows.get(k)
        if i is None:
            i = len(norms)
            n = known.get(k) if shared else None
            norms.append(_norm(t, dim=1) if n is None else n)
            if shared:
                rows[k] = i
        return i

    for key, (_, kind, D, A, pre) in shares.items():  # pre: formed in backward (early())
        if pre is None and D.dim() == 2:
            pairs.append((key, row(D), row(A) if kind == "W" else None))
        elif kind == "W":
            sqs[key] = _sq_norm(D, A, grams) if pre is None else pre
        else:  # ||sum_t delta_t||, exact where it is 0 (not a sum of D D^T)
            pairs.append((key, row(D.sum(1) if pre is None else pre, False), None))
    total, parts = None, {}
    if norms:
        S = torch.stack(norms).square_()  # (rows, B)
        parts = {key: (S, i, j) for key, i, j in pairs}
        total = _combine(S, pairs)
    for key, sq in sqs.items():
        parts[key] = (sq, None, None)
        total = sq.clone() if total is None else total.add_(sq)
    if sqs:  # rounding can take a Gram-form sum below 0 where the gradient is ~0
        total.clamp_(min=0.0)
    return total, parts


def _combine(S: Tensor, pairs) -> Tensor:
    """sum over pairs of S[i] * S[j] (or S[i]): in 3 kernels when, as in an MLP, layer k's W and
    b are rows 2k (delta) and 2k + 1 (a_prev) of S."""
    L = S.shape[0] // 2
    if len(pairs) == 2 * L and all(
            p[1:] == (k, k + 1) and q[1:] == (k, None)
            for p, q, k in zip(pairs[0::2], pairs[1::2], range(0, 2 * L, 2), strict=True)):
        return S[1::2].add(1.0).mul_(S[0::2]).sum(0)  # sum_k ||d_k||^2 (||a_k||^2 + 1)
    if len(pairs) == L and all(p[1:] == (2 * k, 2 * k + 1) for k, p in enumerate(pairs)):
        return S[1::2].mul(S[0::2]).sum(0)  # no biases
    pair = [(i, j) for _, i, j in pairs if j is not None]  # any other mix, in a few kernels
    single = [i for _, i, j in pairs if j is None]
    total = None  # one pair, a run of singles: views of S, no index tensors (native's too)
    if len(pair) == 1:
        total = S[pair[0][0]] * S[pair[0][1]]
    elif pair:
        i, j = (torch.tensor(v, device=S.device) for v in zip(*pair, strict=True))
        total = S.index_select(0, i).mul_(S.index_select(0, j)).sum(0)
    if single:
        s0, m = single[0], len(single)
        t = S[s0:s0 + m].sum(0) if single == list(range(s0, s0 + m)) \
            else S.index_select(0, torch.tensor(single, device=S.device)).sum(0)
        total = t if total is None else total.add_(t)
    return total


def part_sq(part) -> Tensor:
    """One parameter's (B,) squared norm from what sq_norms kept for it; (S, index, None) with
    a tuple index stands for the norm S[index] itself (per_example's stacked rows)."""
    t, i, j = part
    if i is None:
        return t.clamp(min=0.0)  # a Gram-form sum: see sq_norms
    if isinstance(i, tuple):
        return t[i].square()
    return t[i] if j is None else t[i] * t[j]


def clipped(shares, norms: Tensor, max_norm: float, ddp: bool) -> None:
    """Add sum_n c_n delta_n^T a_n, c_n = min(1, C / (norm_n + 1e-6)), to each p.grad: each
    example's share re-weighted before the one GEMM the backward skipped (on the narrower of
    delta and a_prev: the same sum; a (B, T, n) A that several W shares read, as q, k, v do, is
    weighed against all their deltas and re-weighted once). Last layer first, each share freed
    once used, so the widest gradients are formed with the least held."""
    c = (max_norm / (norms + _EPS)).clamp_(max=1.0)
    widths, uses = _readers(shares)
    scaled: dict[tuple, Tensor] = {}  # _key(A) -> c A (B T, n_in), while a share still reads it
    for key in reversed(list(shares)):
        p, kind, D, A, pre = shares.pop(key)
        cd = c.to(D.dtype)
        if D.dim() == 2:
            if kind == "b":
                g = D.t().mv(cd)  # sum_n c_n delta_n
            elif D.shape[1] <= A.shape[1]:
                g = (D * cd[:, None]).t().mm(A)
            else:
                g = D.t().mm(A * cd[:, None])
        elif kind == "b":  # (B, T, n): sum_n c_n sum_t delta_t
            g = (D.sum(1) if pre is None else pre).t().mv(cd)
        else:  # a (B, T, n) W: (B T, n_out)^T (B T, n_in)
            k = _key(A)
            if widths[k] <= A.shape[2]:
                g = (D * cd[:, None, None]).reshape(-1, D.shape[2]).t().mm(
                    A.reshape(-1, A.shape[2]))
            else:
                cA = scaled.get(k)
                if cA is None:
                    cA = scaled[k] = (A * cd[:, None, None]).reshape(-1, A.shape[2])
                g = D.reshape(-1, D.shape[2]).t().mm(cA)
                uses[k] -= 1
                if not uses[k]:
                    del scaled[k], cA
        del D, A, pre
        accumulate(p, g, ddp)


def _readers(shares) -> tuple[dict, dict]:
    """({_key(A): sum of n_out}, {_key(A): count}) over the (B, T, n) W shares, by their A."""
    widths: dict[tuple, int] = {}
    uses: dict[tuple, int] = {}
    for _, kind, D, A, _ in shares.values():
        if kind == "W" and D.dim() == 3:
            k = _key(A)
            widths[k] = widths.get(k, 0) + D.shape[2]
            uses[k] = uses.get(k, 0) + 1
    return widths, uses


def _sq_norm(D: Tensor, A: Tensor, grams: dict | None = None) -> Tensor:
    """||D_n^T A_n||_F^2 per example, D (B, T, n_out), A (B, T, n_in), by the cheaper form.
    grams: a cache {_key(A): (A A^T, A)} for the Gram form (q, k, v read one input)."""
    T, n_out, n_in = D.shape[1], D.shape[2], A.shape[2]
    if T == 1:
        return D.square().sum((1, 2)) * A.square().sum((1, 2))
    if T * (n_in + n_out) <= n_in * n_out:  # Gram: sum_{t,s} (a_t . a_s)(delta_t . delta_s)
        k = None if grams is None else _key(A)
        gram_a, _ = (None, None) if k is None else grams.get(k, (None, None))
        if gram_a is None:
            gram_a = torch.bmm(A, A.transpose(1, 2)).flatten(1)  # (B, T T)
            if k is not None:  # A held with it: no new tensor can take A's memory meanwhile
                grams[k] = gram_a, A
        gram_d = torch.bmm(D, D.transpose(1, 2)).flatten(1)  # (B, T T)
        return torch.linalg.vecdot(gram_a, gram_d)
    return _norm(torch.bmm(D.transpose(1, 2), A).flatten(1), dim=1).square_()


def accumulate(p: Tensor, g: Tensor, ddp: bool) -> None:
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
