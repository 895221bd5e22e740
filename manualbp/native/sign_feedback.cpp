// Sign symmetry's B = sign(W) * s in one pass that reads W only (manualbp/rules.py: feedback_of).
//
// The `feedback` buffer holds +-s in every entry, and feedback_of's Python line is
// torch.copysign(feedback, W): magnitude s, sign bit of W (so -0.0 gives -s and a NaN weight
// gives s with the NaN's sign bit). Here that is one bit operation per entry,
//
//   B_bits = (W_bits & sign_bit) | s_bits,     s_bits = bits of |feedback[0]|,
//
// bit-identical to the copysign, at a memory pass over W and one over B (ATen's copysign reads
// the buffer as well and runs a float kernel). Contiguous CPU float32/float64 W only; the
// Python line serves everything else.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <optional>

namespace manualbp {

using at::Tensor;

namespace {

template <typename scalar_t, typename bits_t>
__attribute__((optimize("O3"))) void sign_loop(const bits_t* __restrict__ w,
                                                bits_t* __restrict__ out, int64_t n,
                                                bits_t s_bits) {
  constexpr bits_t sign = bits_t(1) << (8 * sizeof(bits_t) - 1);
  for (int64_t i = 0; i < n; ++i) out[i] = (w[i] & sign) | s_bits;
}

template <typename scalar_t, typename bits_t>
void fill(const Tensor& W, const Tensor& feedback, Tensor& B) {
  static_assert(sizeof(scalar_t) == sizeof(bits_t));
  scalar_t s = *feedback.const_data_ptr<scalar_t>();
  bits_t s_bits;
  std::memcpy(&s_bits, &s, sizeof s);
  s_bits &= ~(bits_t(1) << (8 * sizeof(bits_t) - 1));  // |s|
  auto w = static_cast<const bits_t*>(W.const_data_ptr());
  auto out = static_cast<bits_t*>(B.data_ptr());
  at::parallel_for(0, W.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    sign_loop<scalar_t, bits_t>(w + begin, out + begin, end - begin, s_bits);
  });
}

}  // namespace

// copysign(feedback, W) for a contiguous CPU float32/float64 W and a feedback of W's shape,
// dtype and device whose every entry is +-s (the buffer attach() and redraw() make); None for
// anything else (feedback_of then runs torch.copysign). The result is outside any graph (B is
// no function of W for autograd): a new tensor or, with in_place where nothing but the caller's
// Python object holds feedback (no graph saved it, no view or detached alias of it lives), the
// buffer itself, written over (its version bumped), so no memory is allocated and touched anew.
std::optional<Tensor> sign_feedback(const Tensor& W, const Tensor& feedback, bool in_place) {
  auto dtype = W.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || !W.device().is_cpu() ||
      !W.is_contiguous() || feedback.scalar_type() != dtype || !feedback.device().is_cpu() ||
      W.layout() != at::kStrided || feedback.layout() != at::kStrided || !W.has_storage() ||
      !feedback.has_storage() || W.sizes() != feedback.sizes() || W.is_neg() ||
      feedback.is_neg()) {
    return std::nullopt;
  }
  // held by its Python object only (feedback is that object's own tensor, not a copy)
  in_place = in_place && feedback.is_contiguous() && feedback.use_count() == 1 &&
             feedback.storage().use_count() == 1 && !feedback.requires_grad() &&
             !feedback.is_inference() && !W.is_alias_of(feedback);
  Tensor B = in_place ? feedback : at::empty(W.sizes(), W.options().requires_grad(false));
  if (W.numel() == 0) return B;
  if (dtype == at::kFloat) {
    fill<float, uint32_t>(W, feedback, B);
  } else {
    fill<double, uint64_t>(W, feedback, B);
  }
  if (in_place) B.unsafeGetTensorImpl()->bump_version();
  return B;
}

// The binding: feedback as the Python object, so its tensor is read without a copy (whose
// reference would count) and an in-place result is handed back as that same object.
py::object sign_feedback_py(const Tensor& W, py::handle feedback, bool in_place) {
  TORCH_CHECK_TYPE(THPVariable_Check(feedback.ptr()),
                   "manualbp native sign_feedback: feedback must be a tensor");
  const Tensor& fb = THPVariable_Unpack(feedback.ptr());
  std::optional<Tensor> B = sign_feedback(W, fb, in_place);
  if (!B.has_value()) return py::none();
  if (B->is_same(fb)) return py::reinterpret_borrow<py::object>(feedback);
  return py::cast(std::move(*B));
}

void bind_sign_feedback(py::module_& m) {
  m.def("sign_feedback", &sign_feedback_py, py::arg("W"), py::arg("feedback"),
        py::arg("in_place") = false);
}

}  // namespace manualbp
