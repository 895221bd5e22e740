// The end of a per_example block in one call, for its common case: manualbp/per_example.py's
// _stacked_norms and per_example_norms.clipped line for line, same kernels in the same order, so
// norms and every .grad are bit-identical to the Python finish (which stays the reference and
// serves every other case: (B, T, n) shares, a reused or frozen layer, grads=True, DDP).
//
//   ||g_n||^2 = sum_k ||delta_k,n||^2 (||a_prev_k,n||^2 + 1)      (the + 1 where layers have b)
//   c_n       = min(1, C / (||g_n|| + 1e-6))
//   grad_W_k  = (c * delta_k)^T a_prev_k,   grad_b_k = delta_k^T c        (last layer first)
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>
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

void bind_per_example(py::module_& m) {
  m.def("finish_rows", &finish_rows, py::arg("deltas"), py::arg("a_prevs"), py::arg("Ws"),
        py::arg("bs"), py::arg("bias"), py::arg("scale"), py::arg("max_norm"));
}

}  // namespace manualbp
