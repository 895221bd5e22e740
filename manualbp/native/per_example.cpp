// The end of a per_example block in one call: the Python finish line for line, same kernels in
// the same order, so norms and every .grad are bit-identical to it (the Python finish stays the
// reference and serves grads=True, DDP and a traced step).
//
// finish_rows, the common case (2-D shares, one call per layer, every layer with W, all or none
// a bias): manualbp/per_example.py's _stacked_norms and per_example_norms.clipped,
//
//   ||g_n||^2 = sum_k ||delta_k,n||^2 (||a_prev_k,n||^2 + 1)      (the + 1 where layers have b)
//   c_n       = min(1, C / (||g_n|| + 1e-6))
//   grad_W_k  = (c * delta_k)^T a_prev_k,   grad_b_k = delta_k^T c        (last layer first)
//
// finish_shares, every other block: per_example_norms.sq_norms and clipped on the shares that
// per_example_norms.group made ((B, T, n) shares in the Gram or outer form, reused and frozen
// layers, any mix of biases).
//
// early_share: a (B, T, n) call's part of the norm (its W's ||delta_n^T a_n||^2, its b's
// sum_t delta_t), formed when the node's backward fills the call's slot (functions.cpp), while
// delta and a_prev are in cache: per_example._Call's probe in Python.
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <map>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "backprop.h"

namespace manualbp {

namespace {

constexpr double kEps = 1e-6;  // per_example_norms._EPS

Tensor row_norms(const Tensor& t) {  // ||t_n|| (B,), as torch.linalg.vector_norm(t, dim=1)
  return at::linalg_vector_norm(t, 2, at::IntArrayRef{1}, false, std::nullopt);
}

// per_example_norms.accumulate without DDP: add g to p.grad as backward would.
void accumulate(const Tensor& p, Tensor g) {
  g = g.to(p.scalar_type()).contiguous();
  Tensor& grad = const_cast<Tensor&>(p).mutable_grad();
  if (!grad.defined()) {
    grad = g;
  } else {
    grad.add_(g);
  }
}

// per_example_norms.clipped for 2-D shares, one per parameter: W_k, b_k in call order, so the
// last call's b comes first.
// Each share is let go once used, so the widest gradients are formed with the least held.
void clipped(std::vector<Tensor>& deltas, std::vector<Tensor>& a_prevs,
             const std::vector<Tensor>& Ws, const std::vector<std::optional<Tensor>>& bs,
             const Tensor& norms, double max_norm) {
  Tensor c = at::reciprocal(at::add(norms, kEps)).mul(max_norm);  // C / (norm + eps), as
  c.clamp_(std::nullopt, 1.0);                                      // Python's float / tensor
  for (size_t k = deltas.size(); k-- > 0;) {
    Tensor D = std::move(deltas[k]);  // (B, n_out)
    Tensor A = std::move(a_prevs[k]);  // (B, n_in)
    Tensor cd = c.to(D.scalar_type());
    if (bs[k].has_value()) accumulate(*bs[k], D.t().mv(cd));  // sum_n c_n delta_n
    Tensor grad_W = D.size(1) <= A.size(1) ? D.mul(cd.unsqueeze(1)).t().mm(A)
                                           : D.t().mm(A.mul(cd.unsqueeze(1)));
    D.reset();
    A.reset();
    accumulate(Ws[k], std::move(grad_W));
  }
}

}  // namespace

// (norms (B,), S (B, L, 2) with S[n, k] = (||delta_k,n||, ||delta_k,n|| ||a_prev_k,n||)) from each
// covered call's delta (B, n_out) and a_prev (B, n_in) (the probes leave the row norms to this
// call when it serves the block). scale: B for a mean loss (g_n = B * share_n).
// max_norm: C, and then each W_k, b_k gets its clipped gradient added to .grad.
// deltas and a_prevs are Python lists that this empties (None for each), so that each share is
// held here alone and freed once used, as the Python finish frees its shares.
std::tuple<Tensor, Tensor> finish_rows(py::list delta_list, py::list a_prev_list,
                                       const std::vector<Tensor>& Ws,
                                       const std::vector<std::optional<Tensor>>& bs, bool bias,
                                       double scale, std::optional<double> max_norm) {
  const size_t L = delta_list.size();
  TORCH_CHECK_VALUE(L > 0 && a_prev_list.size() == L && Ws.size() == L && bs.size() == L,
                    "manualbp native: finish_rows expected, per call, a delta, an a_prev, a W "
                    "and a b; got ", L, ", ", a_prev_list.size(), ", ", Ws.size(), ", ",
                    bs.size());
  std::vector<Tensor> deltas, a_prevs;
  for (size_t k = 0; k < L; ++k) {
    deltas.push_back(delta_list[k].cast<Tensor>());
    a_prevs.push_back(a_prev_list[k].cast<Tensor>());
    delta_list[k] = py::none();
    a_prev_list[k] = py::none();
  }
  std::vector<Tensor> norms_of;  // ||delta_1,n||, ||a_1,n||, ||delta_2,n||, ...
  norms_of.reserve(2 * L);
  for (size_t k = 0; k < L; ++k) {
    norms_of.push_back(row_norms(deltas[k]));
    norms_of.push_back(row_norms(a_prevs[k]));
  }
  Tensor S = at::stack(norms_of, 1);  // (B, 2L)
  const int64_t B = S.size(0);
  S = S.view({B, static_cast<int64_t>(L), 2});
  S.select(2, 1).mul_(S.select(2, 0));  // ||delta_n a_n^T|| = ||delta_n|| ||a_n||
  Tensor norms = row_norms(bias ? S.view({B, -1}) : S.select(2, 1));
  if (scale != 1.0) norms.mul_(scale);
  if (max_norm.has_value()) {
    clipped(deltas, a_prevs, Ws, bs, norms, *max_norm);
  }
  return {norms, S};
}

// per_example_norms._key: which values t holds (data_ptr, dtype, shape, strides).
using Key = std::vector<int64_t>;

namespace {

Key key_of(const Tensor& t) {
  Key k{reinterpret_cast<int64_t>(t.data_ptr()), static_cast<int64_t>(t.scalar_type()), t.dim()};
  for (int64_t s : t.sizes()) k.push_back(s);
  for (int64_t s : t.strides()) k.push_back(s);
  return k;
}

// per_example_norms.group's share of one parameter: delta D (B, n_out) or (B, T, n_out), and
// a_prev A like it for a W (undefined for a b); pre: what the call's slot formed in backward
// for a parameter called once (a W's squared norm (B,), a b's sum_t delta_t (B, n)), or
// undefined.
struct Share {
  Tensor p;
  bool is_W;
  Tensor D, A, pre;
};

// One parameter's part of the squared norm, as sq_norms keeps it for norms_by_param:
// S[i] * S[j] (j = -1: S[i] alone), or sq (B,) itself (i = -1).
struct Part {
  Tensor sq;
  int64_t i = -1, j = -1;
};

// per_example_norms._sq_norm: ||D_n^T A_n||_F^2 per example, by the cheaper form.
Tensor sq_norm(const Tensor& D, const Tensor& A, std::map<Key, Tensor>& grams) {
  const int64_t T = D.size(1), n_out = D.size(2), n_in = A.size(2);
  if (T == 1) return D.square().sum({1, 2}) * A.square().sum({1, 2});
  if (T * (n_in + n_out) <= n_in * n_out) {  // Gram: sum_{t,s} (a_t . a_s)(delta_t . delta_s)
    Key k = key_of(A);
    auto it = grams.find(k);
    Tensor gram_a;
    if (it == grams.end()) {
      gram_a = at::bmm(A, A.transpose(1, 2)).flatten(1);  // (B, T T)
      grams[k] = gram_a;
    } else {
      gram_a = it->second;
    }
    Tensor gram_d = at::bmm(D, D.transpose(1, 2)).flatten(1);  // (B, T T)
    return at::linalg_vecdot(gram_a, gram_d, -1);
  }
  return row_norms(at::bmm(D.transpose(1, 2), A).flatten(1)).square_();
}

// A a_prev A A^T formed in a backward, keyed by key_of(A), with A held so that its memory (and
// so its key) cannot be taken by another tensor while the entry lives; functions.cpp's slots
// lock guards it, and it is emptied when a slot opens (a forward: a new pass) and when the
// last open slot is taken.
std::map<Key, Tensor> early_grams;
std::vector<Tensor> early_held;

}  // namespace

// per_example._Call's early part, on what a node's backward hands a covered call's slot:
// (sq, dsum) for a share that per_example_norms.group keeps as (B, T, n) (its rule: a delta
// of more than 3 dims or not B rows is reshaped to (B, -1, n)), sq = ||delta_n^T a_n||^2 (B,)
// where W is covered, dsum = sum_t delta_t (B, n) where b is; both undefined for 2-D rows.
std::pair<Tensor, Tensor> early_share(const Tensor& delta, const Tensor& a_prev, int64_t batch,
                                      bool W, bool b) {
  Tensor D = delta.detach(), A = a_prev.defined() ? a_prev.detach() : Tensor();
  const int64_t n_out = D.size(-1);
  if (D.dim() > 3 || D.size(0) != batch) {
    if (batch <= 0 || D.numel() % (batch * std::max<int64_t>(n_out, 1)) != 0) return {};
    D = D.reshape({batch, -1, n_out});
    if (A.defined()) A = A.reshape({batch, -1, A.size(-1)});
  }
  if (D.dim() != 3) return {};
  Tensor sq, dsum;
  if (W && A.defined()) {
    const size_t before = early_grams.size();
    sq = sq_norm(D, A, early_grams);
    if (early_grams.size() != before) early_held.push_back(A);
  }
  if (b) dsum = D.sum(1);
  return {sq, dsum};
}

// Forget the backward's A A^T (every slot is closed).
void drop_early_grams() {
  early_grams.clear();
  early_held.clear();
}

namespace {

// per_example_norms._combine: sum over pairs of S[i] * S[j] (or S[i]).
Tensor combine(const Tensor& S, const std::vector<Part>& pairs) {
  const int64_t L = S.size(0) / 2;
  const auto n = static_cast<int64_t>(pairs.size());
  bool mlp = n == 2 * L;  // layer k's W and b are rows 2k (delta) and 2k + 1 (a_prev)
  for (int64_t k = 0; mlp && k < L; ++k) {
    mlp = pairs[2 * k].i == 2 * k && pairs[2 * k].j == 2 * k + 1 && pairs[2 * k + 1].i == 2 * k &&
          pairs[2 * k + 1].j == -1;
  }
  if (mlp) {
    return S.slice(0, 1, std::nullopt, 2).add(1.0).mul_(S.slice(0, 0, std::nullopt, 2)).sum(0);
  }
  bool no_bias = n == L;
  for (int64_t k = 0; no_bias && k < L; ++k) {
    no_bias = pairs[k].i == 2 * k && pairs[k].j == 2 * k + 1;
  }
  if (no_bias) return S.slice(0, 1, std::nullopt, 2).mul(S.slice(0, 0, std::nullopt, 2)).sum(0);
  std::vector<int64_t> i, j, single;  // any other mix, in a few kernels
  for (const Part& pair : pairs) {
    if (pair.j < 0) {
      single.push_back(pair.i);
    } else {
      i.push_back(pair.i);
      j.push_back(pair.j);
    }
  }
  auto rows = [&S](const std::vector<int64_t>& index) {
    return S.index_select(0, at::tensor(index, at::kLong).to(S.device()));
  };
  Tensor total;  // one pair, a run of singles: views of S, no index tensors (as Python's)
  if (i.size() == 1) {
    total = S.select(0, i[0]).mul(S.select(0, j[0]));
  } else if (!i.empty()) {
    total = rows(i).mul_(rows(j)).sum(0);
  }
  if (!single.empty()) {
    const auto m = static_cast<int64_t>(single.size());
    bool run = true;
    for (int64_t k = 1; run && k < m; ++k) run = single[k] == single[0] + k;
    Tensor t = run ? S.narrow(0, single[0], m).sum(0) : rows(single).sum(0);
    total = total.defined() ? total.add_(t) : t;
  }
  return total;
}

// per_example_norms.sq_norms (no row norms known): (total (B,), S (rows, B) or undefined, each
// share's Part).
std::tuple<Tensor, Tensor, std::vector<Part>> sq_norms(const std::vector<Share>& shares) {
  std::map<Key, int64_t> rows;  // key_of(t) -> index of ||t_n|| in the stack
  std::vector<Tensor> norms;  // ||t_n||, t a 2-D delta or a_prev (or a bias's sum over T)
  std::vector<Part> parts(shares.size());
  std::vector<size_t> paired, squared;  // shares whose part is a pair of rows, a (B,) sq
  std::map<Key, Tensor> grams;  // key_of(A) -> A A^T, shared by layers fed the same input
  auto row = [&](const Tensor& t, bool shared) -> int64_t {
    Key k;
    if (shared) {
      k = key_of(t);
      auto it = rows.find(k);
      if (it != rows.end()) return it->second;
    }
    const auto i = static_cast<int64_t>(norms.size());
    norms.push_back(row_norms(t));
    if (shared) rows[k] = i;
    return i;
  };
  for (size_t s = 0; s < shares.size(); ++s) {
    const Share& share = shares[s];
    const Tensor& D = share.D;  // undefined where the call let it go (pre is then defined)
    if (!share.pre.defined() && D.dim() == 2) {
      parts[s].i = row(D, true);
      if (share.is_W) parts[s].j = row(share.A, true);
      paired.push_back(s);
    } else if (share.is_W) {
      parts[s].sq = share.pre.defined() ? share.pre : sq_norm(D, share.A, grams);
      squared.push_back(s);
    } else {  // ||sum_t delta_t||, next to its W's use of D
      parts[s].i = row(share.pre.defined() ? share.pre : D.sum(1), false);
      paired.push_back(s);
    }
  }
  Tensor total, S;
  if (!norms.empty()) {
    S = at::stack(norms).square_();  // (rows, B)
    std::vector<Part> pairs;
    for (size_t s : paired) pairs.push_back(parts[s]);
    total = combine(S, pairs);
  }
  for (size_t s : squared) {
    total = total.defined() ? total.add_(parts[s].sq) : parts[s].sq.clone();
  }
  if (!squared.empty()) total.clamp_(0.0);  // a Gram-form sum rounded below 0
  return {total, S, parts};
}

// per_example_norms.clipped: each share re-weighted by c before the one GEMM the backward
// skipped, last share first, each freed once used; a (B, T, n) A that several W shares read is
// weighed against all their deltas and re-weighted once (_readers).
void clipped(std::vector<Share>& shares, const Tensor& norms, double max_norm) {
  Tensor c = at::reciprocal(at::add(norms, kEps)).mul(max_norm);
  c.clamp_(std::nullopt, 1.0);
  std::map<Key, int64_t> widths, uses;  // by key_of(A): sum of n_out, count
  for (const Share& share : shares) {
    if (share.is_W && share.D.dim() == 3) {
      Key k = key_of(share.A);
      widths[k] += share.D.size(2);
      uses[k] += 1;
    }
  }
  std::map<Key, Tensor> scaled;  // key_of(A) -> c A (B T, n_in), while a share still reads it
  for (size_t s = shares.size(); s-- > 0;) {
    Share share = std::move(shares[s]);
    Tensor D = std::move(share.D), A = std::move(share.A), pre = std::move(share.pre);
    Tensor cd = c.to(D.scalar_type());
    Tensor g;
    if (D.dim() == 2) {
      if (!share.is_W) {
        g = D.t().mv(cd);  // sum_n c_n delta_n
      } else if (D.size(1) <= A.size(1)) {
        g = D.mul(cd.unsqueeze(1)).t().mm(A);
      } else {
        g = D.t().mm(A.mul(cd.unsqueeze(1)));
      }
    } else if (!share.is_W) {  // (B, T, n): sum_n c_n sum_t delta_t
      g = (pre.defined() ? pre : D.sum(1)).t().mv(cd);
    } else {  // a (B, T, n) W: (B T, n_out)^T (B T, n_in)
      Key k = key_of(A);
      if (widths[k] <= A.size(2)) {
        g = D.mul(cd.view({-1, 1, 1})).reshape({-1, D.size(2)}).t().mm(
            A.reshape({-1, A.size(2)}));
      } else {
        auto it = scaled.find(k);
        if (it == scaled.end()) {
          it = scaled.emplace(k, A.mul(cd.view({-1, 1, 1})).reshape({-1, A.size(2)})).first;
        }
        g = D.reshape({-1, D.size(2)}).t().mm(it->second);
        if (--uses[k] == 0) scaled.erase(it);
      }
    }
    D.reset();
    A.reset();
    pre.reset();
    accumulate(share.p, std::move(g));
  }
}

}  // namespace

// (norms (B,), S (rows, B) or None, parts) for the shares per_example_norms.group made, given
// as lists of the parameter, whether it is a W, its D, its A (None for a b) and what its slot
// or probe formed in backward (None where nothing: Share::pre). parts: per
// share (sq or None, i, j) with what sq_norms keeps for norms_by_param ((S, i, j) where sq is
// None, j = -1 for none). scale, max_norm: as finish_rows. Ds, As and pres are emptied (None
// for each), so that each share is held here alone and freed once used.
std::tuple<Tensor, std::optional<Tensor>, std::vector<std::tuple<std::optional<Tensor>, int64_t,
                                                                 int64_t>>>
finish_shares(const std::vector<Tensor>& params, const std::vector<bool>& is_W, py::list D_list,
              py::list A_list, py::list pre_list, double scale, std::optional<double> max_norm) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(n > 0 && is_W.size() == n && D_list.size() == n && A_list.size() == n &&
                        pre_list.size() == n,
                    "manualbp native: finish_shares expected, per share, a parameter, a kind, a "
                    "D, an A and a pre; got ", n, ", ", is_W.size(), ", ", D_list.size(), ", ",
                    A_list.size(), ", ", pre_list.size());
  std::vector<Share> shares;
  auto take = [](py::list& list, size_t s) {
    Tensor t = list[s].is_none() ? Tensor() : list[s].cast<Tensor>();
    list[s] = py::none();
    return t;
  };
  for (size_t s = 0; s < n; ++s) {
    Tensor D = take(D_list, s), A = take(A_list, s), pre = take(pre_list, s);
    shares.push_back(Share{params[s], is_W[s], D, A, pre});
  }
  auto [total, S, parts] = sq_norms(shares);
  Tensor norms = total.sqrt_();
  if (scale != 1.0) norms.mul_(scale);
  if (max_norm.has_value()) clipped(shares, norms, *max_norm);
  std::vector<std::tuple<std::optional<Tensor>, int64_t, int64_t>> out;
  for (Part& part : parts) {
    out.emplace_back(part.sq.defined() ? std::optional<Tensor>(part.sq) : std::nullopt, part.i,
                     part.j);
  }
  return {norms, S.defined() ? std::optional<Tensor>(S) : std::nullopt, out};
}

void bind_per_example(py::module_& m) {
  m.def("finish_rows", &finish_rows, py::arg("deltas"), py::arg("a_prevs"), py::arg("Ws"),
        py::arg("bs"), py::arg("bias"), py::arg("scale"), py::arg("max_norm"));
  m.def("finish_shares", &finish_shares, py::arg("params"), py::arg("is_W"), py::arg("Ds"),
        py::arg("As"), py::arg("pres"), py::arg("scale"), py::arg("max_norm"));
}

}  // namespace manualbp
