// The three loss Functions of losses.py as torch::autograd::Functions: softmax cross-entropy
// (every option), sigmoid binary cross-entropy and MSE, each backward its hand-written delta[L].
// Same saved tensors, same kernels, same order as the Python Functions.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "backprop.h"

namespace manualbp {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

namespace {

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

int64_t reduction_code(const std::string& reduction) {  // as torch's _Reduction.get_enum
  if (reduction == "none") return 0;
  if (reduction == "mean") return 1;
  TORCH_CHECK_VALUE(reduction == "sum", "manualbp native: unknown reduction '", reduction, "'");
  return 2;
}

}  // namespace

// (loss, log yhat): SoftmaxCrossEntropyFunction (losses.py), every option.
struct SoftmaxCENode : torch::autograd::Function<SoftmaxCENode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& target,
                               const OptTensor& weight, int64_t ignore_index,
                               const std::string& reduction, double label_smoothing) {
    BelowAutograd below;  // apply runs forward in no-grad mode
    int64_t red = reduction_code(reduction);
    Tensor log_yhat = at::log_softmax(z, 1);
    Tensor loss, count;  // count: the kernel's total weight of the rows it kept
    if (label_smoothing == 0 && !target.is_floating_point()) {  // refuses a bad class index
      std::tie(loss, count) = at::nll_loss_forward(log_yhat, target, weight, red, ignore_index);
    } else {
      loss = at::cross_entropy_loss(z, target, weight, red, ignore_index, label_smoothing);
    }
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = red;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({target, weight.value_or(Tensor()), log_yhat, count});
    return {loss, log_yhat};
  }

  // class_index_delta (losses.py): delta_L = w_y (yhat - y) * grad / count for class indices,
  // in the loss kernels' own two steps (nll_loss_backward, then log-softmax's backward).
  static Tensor class_index_delta(const Tensor& grad, const Tensor& log_yhat, const Tensor& target,
                                  const Tensor& weight, int64_t red, int64_t ignore_index,
                                  const Tensor& count) {
    Tensor minus_y = at::nll_loss_backward(grad, log_yhat, target, opt(weight), red,
                                           ignore_index, count);
    return at::_log_softmax_backward_data(minus_y, log_yhat, 1, log_yhat.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    std::optional<BelowAutograd> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // no create_graph: no graph to record
    variable_list saved = ctx->get_saved_variables();
    const Tensor &target = saved[0], &weight = saved[1], &log_yhat = saved[2], &count = saved[3];
    int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    int64_t red = ctx->saved_data["reduction"].toInt();
    double ls = ctx->saved_data["label_smoothing"].toDouble();

    const Tensor &grad = grad_out[0], &grad_log_yhat = grad_out[1];
    const bool indices = count.defined();  // class indices, no smoothing
    Tensor yhat = indices && !grad_log_yhat.defined() ? Tensor() : at::exp(log_yhat);
    Tensor grad_z, grad_target;
    if (grad.defined() && indices) {
      grad_z = class_index_delta(grad, log_yhat, target, weight, red, ignore_index, count);
    } else if (grad.defined()) {
      const int64_t m = log_yhat.size(0), C = log_yhat.size(1);
      Tensor t, denom_t;  // the target rows and the mean's divisor (undefined: m)
      Tensor valid;       // the rows not ignored (undefined: none can be)
      if (target.is_floating_point()) {  // class probabilities
        t = ls == 0 ? target : at::add(at::mul(target, 1 - ls), ls / C);
        if (weight.defined()) t = at::mul(t, weight);
      } else {  // class indices with label smoothing
        valid = at::ne(target, ignore_index);
        Tensor y = target.masked_fill(at::bitwise_not(valid), 0);
        Tensor w = weight.defined() ? weight : at::ones({C}, log_yhat.options());
        Tensor w_y = at::mul(at::index(w, {y}), valid);  // 0 where ignored
        t = at::zeros_like(log_yhat).scatter(1, y.unsqueeze(1), at::mul(w_y, 1 - ls).unsqueeze(1));
        if (ls != 0) t = at::add(t, at::mul(at::mul(w, ls / C), valid.unsqueeze(1)));
        denom_t = w_y.sum();
      }
      Tensor scale = red == 0 ? (grad.dim() ? grad.unsqueeze(-1) : grad)
                     : red == 1 ? (denom_t.defined() ? at::div(grad, denom_t) : at::div(grad, m))
                                : grad;
      grad_z = at::mul(at::sub(at::mul(t.sum(1, true), yhat), t), scale);
      if (valid.defined() && red == 1) {
        // An ignored row contributes nothing, even when every row is ignored and the mean's
        // denominator is 0 (torch's gradient is then 0, not 0 * inf = NaN).
        grad_z = at::where(valid.unsqueeze(1), grad_z, at::zeros({}, grad_z.options()));
      }
      if (ctx->needs_input_grad(1)) {  // probability targets: dL/dt = -(1-eps) w log yhat
        Tensor wl = weight.defined() ? at::mul(at::mul(weight, -(1 - ls)), log_yhat)
                                     : at::mul(log_yhat, -(1 - ls) * 1.0);
        grad_target = at::mul(wl, scale);
      }
    }
    if (grad_log_yhat.defined()) {  // only double backward reaches log yhat
      Tensor g = at::sub(grad_log_yhat, at::mul(yhat, grad_log_yhat.sum(1, true)));
      grad_z = grad_z.defined() ? at::add(grad_z, g) : g;
    }
    return {grad_z, grad_target, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// SigmoidBCEFunction (losses.py): delta_L = w ((1 + (p - 1) y) yhat - p y).
struct SigmoidBCENode : torch::autograd::Function<SigmoidBCENode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const Tensor& y,
                        const OptTensor& weight, const OptTensor& pos_weight,
                        const std::string& reduction) {
    BelowAutograd below;  // apply runs forward in no-grad mode
    int64_t red = reduction_code(reduction);
    ctx->saved_data["reduction"] = red;
    ctx->save_for_backward(
        {z, y, weight.value_or(Tensor()), pos_weight.value_or(Tensor())});
    return at::binary_cross_entropy_with_logits(z, y, weight, pos_weight, red);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    std::optional<BelowAutograd> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // no create_graph: no graph to record
    variable_list saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &y = saved[1], &weight = saved[2], &pos_weight = saved[3];
    const Tensor& grad = grad_out[0];
    Tensor scale = ctx->saved_data["reduction"].toInt() != 1 ? grad : at::div(grad, z.numel());
    Tensor w = weight.defined() ? at::mul(weight, scale) : scale;
    Tensor grad_z, grad_y;
    if (ctx->needs_input_grad(0)) {
      Tensor yhat = at::sigmoid(z);
      Tensor delta_L = !pos_weight.defined()
          ? at::sub(yhat, y)
          : at::sub(at::mul(at::add(at::mul(at::sub(pos_weight, 1), y), 1), yhat),
                    at::mul(pos_weight, y));
      grad_z = at::mul(delta_L, w);
    }
    if (ctx->needs_input_grad(1)) {  // dL/dy = -w [p log sigma(z) - log(1 - sigma(z))]
      Tensor sp = at::softplus(at::neg(z), 1.0, 20.0);
      Tensor p_sp = pos_weight.defined() ? at::mul(pos_weight, sp) : at::mul(sp, 1.0);
      grad_y = at::mul(at::sub(p_sp, at::softplus(z, 1.0, 20.0)), w);
    }
    return {grad_z, grad_y, Tensor(), Tensor(), Tensor()};
  }
};

// MSEFunction (losses.py): delta_L = 2 (yhat - y), over m for 'mean'.
struct MSENode : torch::autograd::Function<MSENode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& yhat, const Tensor& y,
                        const std::string& reduction) {
    BelowAutograd below;  // apply runs forward in no-grad mode
    int64_t red = reduction_code(reduction);
    ctx->saved_data["reduction"] = red;
    ctx->save_for_backward({yhat, y});
    return at::mse_loss(yhat, y, red);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    std::optional<BelowAutograd> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // no create_graph: no graph to record
    variable_list saved = ctx->get_saved_variables();
    const Tensor &yhat = saved[0], &y = saved[1];
    const Tensor& grad = grad_out[0];
    Tensor scale = ctx->saved_data["reduction"].toInt() != 1 ? grad : at::div(grad, yhat.numel());
    Tensor delta_L = at::mul(at::mul(at::sub(yhat, y), 2), scale);
    return {ctx->needs_input_grad(0) ? delta_L : Tensor(),
            ctx->needs_input_grad(1) ? at::neg(delta_L) : Tensor(), Tensor()};
  }
};

// softmax_cross_entropy's usual call (loss_checks.plain_cross_entropy, told in C++, where each
// tensor read costs nanoseconds rather than Python's ~50): (N, C) dense float32/float64 logits and
// (N,) dense int64 class indices (neither nested) with a known reduction; the caller has seen
// no weight and no smoothing. The loss, or None for any other call (the Python checks then say
// what is wrong or flatten it). N == len(target) is left to the kernel, as in Python.
py::object softmax_ce_plain(py::handle input, py::handle target, int64_t ignore_index,
                            const std::string& reduction) {
  if (!THPVariable_Check(input.ptr()) || !THPVariable_Check(target.ptr())) return py::none();
  const Tensor& z = THPVariable_Unpack(input.ptr());
  const Tensor& y = THPVariable_Unpack(target.ptr());
  if (z.is_nested() || y.is_nested() || z.layout() != at::kStrided ||
      y.layout() != at::kStrided || z.dim() != 2 || y.dim() != 1 ||
      y.scalar_type() != at::kLong ||
      (z.scalar_type() != at::kFloat && z.scalar_type() != at::kDouble) ||
      (reduction != "mean" && reduction != "sum" && reduction != "none")) {
    return py::none();
  }
  return py::cast(SoftmaxCENode::apply(z, y, std::nullopt, ignore_index, reduction, 0.0)[0]);
}

void bind_losses(py::module_& m) {
  m.def("softmax_ce_plain", &softmax_ce_plain);
  m.def("softmax_cross_entropy",
        [](const Tensor& z, const Tensor& target, const OptTensor& weight, int64_t ignore_index,
           const std::string& reduction, double label_smoothing) {
          return SoftmaxCENode::apply(z, target, weight, ignore_index, reduction,
                                      label_smoothing);
        });
  m.def("sigmoid_binary_cross_entropy",
        [](const Tensor& z, const Tensor& y, const OptTensor& weight,
           const OptTensor& pos_weight, const std::string& reduction) {
          return SigmoidBCENode::apply(z, y, weight, pos_weight, reduction);
        });
  m.def("mse_loss", [](const Tensor& yhat, const Tensor& y, const std::string& reduction) {
    return MSENode::apply(yhat, y, reduction);
  });
}

}  // namespace manualbp
