// torch::autograd::Functions over the pass in backprop.cpp, and the engine-free step: the
// C++ twins of MLPEagerFunction (fused.py), LinearActEagerFunction (linear.py), the three loss
// Functions (losses.py) and MLP.backprop (mlp.py). Same saved tensors, same kernels, same order.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include "backprop.h"

namespace manualbp {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

namespace {

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// W1, b1, ..., WL, bL with an undefined Tensor for each missing bias, from the defined ones
// (autograd's C++ Function takes no undefined inputs) and which layers have a bias.
std::vector<Tensor> with_gaps(at::TensorList defined, const c10::List<bool>& has_bias) {
  std::vector<Tensor> flat;
  size_t k = 0;
  for (bool has : has_bias) {
    flat.push_back(defined[k++]);
    flat.push_back(has ? defined[k++] : Tensor());
  }
  return flat;
}


int64_t reduction_code(const std::string& reduction) {  // as torch's _Reduction.get_enum
  if (reduction == "none") return 0;
  if (reduction == "mean") return 1;
  TORCH_CHECK_VALUE(reduction == "sum", "manualbp native: unknown reduction '", reduction, "'");
  return 2;
}

std::vector<int64_t> codes(const std::vector<std::string>& activations) {
  std::vector<int64_t> out;
  for (const auto& name : activations) out.push_back(static_cast<int64_t>(step_of(name).act));
  return out;
}

std::vector<Step> steps_of(const c10::IValue& codes) {
  std::vector<Step> steps;
  for (int64_t c : codes.toIntList()) steps.push_back(step_of(static_cast<Act>(c)));
  return steps;
}

}  // namespace

// logits[, loss] for x (*, n_0): MLPEagerFunction's forward and backward.
// has_feedback, direct, feedback: a learning rule's matrices (rules.split's), the defined ones
// (DFA's output layer has none) and which layers hold one; all empty for backprop.
struct MLPNode : torch::autograd::Function<MLPNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& target,
                               const std::vector<std::string>& activations,
                               const c10::List<bool>& has_bias, at::TensorList defined,
                               const c10::List<bool>& has_feedback, bool direct,
                               at::TensorList feedback) {
    std::vector<Step> steps = plan(activations);
    std::vector<Tensor> params = with_gaps(defined, has_bias);
    auto [outs, zs] = forward_pass(rows(x), steps, params, /*inplace=*/true);
    Tensor a_L = outs.back();
    Tensor logits = a_L;
    if (x.dim() != 2) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
      shape.push_back(a_L.size(-1));
      logits = a_L.reshape(shape);
    }
    ctx->saved_data["steps"] = codes(activations);
    ctx->saved_data["bias"] = has_bias;
    ctx->saved_data["feedback"] = has_feedback;
    ctx->saved_data["direct"] = direct;
    ctx->set_materialize_grads(false);
    if (steps.back().identity || steps.back().keeps_z) outs.back() = Tensor();
    variable_list saved = {x, Tensor(), Tensor(), Tensor()};
    variable_list result = {logits};
    if (target.has_value()) {
      Tensor y = target->reshape(-1);
      auto [log_yhat, loss, count] = softmax_ce_forward(a_L, y);
      saved = {x, y, log_yhat, count};
      result.push_back(loss);
    }
    saved.insert(saved.end(), defined.begin(), defined.end());
    saved.insert(saved.end(), outs.begin(), outs.end());
    saved.insert(saved.end(), zs.begin(), zs.end());
    saved.insert(saved.end(), feedback.begin(), feedback.end());
    ctx->save_for_backward(std::move(saved));
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    std::vector<Step> steps = steps_of(ctx->saved_data["steps"]);
    const size_t L = steps.size();
    c10::List<bool> has_bias = ctx->saved_data["bias"].toBoolList();
    c10::List<bool> has_feedback = ctx->saved_data["feedback"].toBoolList();
    const bool direct = ctx->saved_data["direct"].toBool();
    size_t P = L;  // how many parameters were given
    for (bool has : has_bias) P += has;
    size_t F = 0;  // how many feedback matrices
    for (bool has : has_feedback) F += has;
    variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &y = saved[1], &count = saved[3];
    Tensor log_yhat = saved[2];
    std::vector<Tensor> params =
        with_gaps(at::TensorList(saved.data() + 4, P), has_bias);
    std::vector<Tensor> outs(saved.begin() + 4 + P, saved.begin() + 4 + P + L);
    std::vector<Tensor> zs(saved.begin() + 4 + P + L, saved.begin() + 4 + P + 2 * L);
    std::vector<Tensor> feedback;  // per layer, undefined where a layer has none
    size_t k = 4 + P + 2 * L;
    for (bool has : has_feedback) feedback.push_back(has ? saved[k++] : Tensor());
    Tensor x2 = rows(x);
    bool scratch = !at::GradMode::is_enabled();
    if (!scratch) {  // create_graph: rebuild a[i], z[i] as functions of x and the weights
      std::tie(outs, zs) = forward_pass(x2, steps, params, false);
      if (log_yhat.defined()) log_yhat = at::log_softmax(outs.back(), 1);
    }
    Tensor grad_a;
    bool own = false;
    if (grad_out[0].defined()) grad_a = rows(grad_out[0]);
    if (grad_out.size() > 1 && grad_out[1].defined()) {
      Tensor delta_L = softmax_ce_delta(grad_out[1], log_yhat, y, count);
      grad_a = grad_a.defined() ? grad_a + delta_L : delta_L;
      own = scratch;
    }
    // x, target, activations, has_bias, the given parameters, has_feedback, direct, feedback
    variable_list result(4 + P + 2 + F);
    if (!grad_a.defined()) return result;
    // edges: x, then the target when there is one (an integer tensor), then each parameter,
    // then each feedback matrix
    size_t edge = y.defined() ? 2 : 1;
    std::vector<bool> needs = {ctx->needs_input_grad(0)};
    std::vector<Tensor> weights;
    for (size_t j = 0; j < 2 * L; ++j) {
      needs.push_back(params[j].defined() && ctx->needs_input_grad(edge++));
    }
    const bool per_layer = F > 0 && !direct;
    if (per_layer) {  // which B want a gradient (Kolen-Pollack's)
      for (size_t i = 0; i < L; ++i) {
        needs.push_back(feedback[i].defined() && ctx->needs_input_grad(edge++));
      }
    }
    for (size_t i = 0; i < L; ++i) weights.push_back(params[2 * i]);
    if (F == 0) feedback.clear();  // backprop
    auto [grads, grad_x] = backward_pass(grad_a, own, x2, outs, zs, weights, steps, needs,
                                         scratch, feedback, direct);
    if (grad_x.defined() && needs[0]) result[0] = grad_x.reshape(x.sizes());
    k = 4;
    for (size_t j = 0; j < 2 * L; ++j) {
      if (params[j].defined()) result[k++] = grads[j];
    }
    if (per_layer) {
      k += 2;  // has_feedback, direct
      for (size_t i = 0; i < L; ++i) result[k++] = grads[2 * L + i];
    }
    return result;
  }
};

// a = g(a_prev W^T + b): LinearActEagerFunction for every activation. Where g' reads a, a is
// saved as the output it is; where g' needs z, z is saved and, under create_graph, rebuilt from
// the saved inputs so that second derivatives stay exact. B: a learning rule's feedback matrix
// (shaped like W), which the error goes down through instead of W; when it wants a gradient
// (Kolen-Pollack) that is grad_W.
struct LinearActNode : torch::autograd::Function<LinearActNode> {
  // need_a_prev, need_W: whether a gradient will be asked of each, W's counting B's (read
  // before apply, which runs forward with grad mode off and, when nothing requires grad, with
  // no edges to ask).
  static Tensor forward(AutogradContext* ctx, const Tensor& a_prev, const Tensor& W,
                        const OptTensor& b, const OptTensor& B, const std::string& activation,
                        bool need_a_prev, bool need_W) {
    Step step = step_of(activation);
    Tensor z = at::linear(a_prev, W, b);  // (*, n_out)
    ctx->saved_data["act"] = static_cast<int64_t>(step.act);
    ctx->saved_data["bias"] = b.has_value();
    ctx->saved_data["B"] = B.has_value();
    Tensor down = B.has_value() ? *B : W;  // what grad_a_prev is formed with
    if (step.keeps_z) {
      Tensor a = g(step, z, false);
      ctx->save_for_backward({a_prev, W, b.value_or(Tensor()), z, B.value_or(Tensor())});
      return a;
    }
    Tensor a = g(step, z, true);
    ctx->save_for_backward({need_W ? a_prev : Tensor(), need_a_prev ? down : Tensor(), Tensor(),
                            step.identity ? Tensor() : a, Tensor()});
    return a;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    Step step = step_of(static_cast<Act>(ctx->saved_data["act"].toInt()));
    bool has_bias = ctx->saved_data["bias"].toBool();
    bool has_B = ctx->saved_data["B"].toBool();
    variable_list saved = ctx->get_saved_variables();
    const Tensor &a_prev = saved[0], &W = saved[1];
    Tensor t = saved[3];
    const Tensor& grad_a = grad_out[0];
    variable_list result(8);  // a_prev, W, b, B, activation, need_a_prev, need_W
    if (!grad_a.defined()) return result;
    if (step.keeps_z && at::GradMode::is_enabled()) t = at::linear(a_prev, W, opt(saved[2]));
    Tensor delta = step.identity ? grad_a : delta_from(grad_a, t, step, false);
    // edges: a_prev, W, then b and B where given
    bool need_W = ctx->needs_input_grad(1);
    bool need_B = has_B && ctx->needs_input_grad(has_bias ? 3 : 2);
    const Tensor& down = step.keeps_z && has_B ? saved[4] : W;  // saved as `down` otherwise
    auto [grad_a_prev, grad_W, grad_b] =
        layer_grads(delta, a_prev, down, ctx->needs_input_grad(0), need_W || need_B,
                    has_bias && ctx->needs_input_grad(2));
    result[0] = grad_a_prev;
    result[1] = need_W ? grad_W : Tensor();
    result[2] = grad_b;
    result[3] = need_B ? grad_W : Tensor();
    return result;
  }
};

// (loss, log yhat): SoftmaxCrossEntropyFunction (losses.py), every option.
struct SoftmaxCENode : torch::autograd::Function<SoftmaxCENode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& target,
                               const OptTensor& weight, int64_t ignore_index,
                               const std::string& reduction, double label_smoothing) {
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

  // _plain_one_hot (losses.py): every row a plain one-hot, read off the kernel's count; false
  // (the general form, the same bits) where that would read the device.
  static bool plain_one_hot(const Tensor& target, const Tensor& weight, int64_t ignore_index,
                            int64_t red, double ls, const Tensor& count) {
    if (weight.defined() || ls != 0 || target.is_floating_point()) return false;
    if (!target.device().is_cpu()) return false;
    if (red == 0) return !at::eq(target, ignore_index).any().item<bool>();
    return count.item<double>() == static_cast<double>(target.numel());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    variable_list saved = ctx->get_saved_variables();
    const Tensor &target = saved[0], &weight = saved[1], &log_yhat = saved[2], &count = saved[3];
    int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    int64_t red = ctx->saved_data["reduction"].toInt();
    double ls = ctx->saved_data["label_smoothing"].toDouble();

    const Tensor &grad = grad_out[0], &grad_log_yhat = grad_out[1];
    Tensor yhat = at::exp(log_yhat);
    Tensor grad_z, grad_target;
    if (grad.defined()) {
      const int64_t m = log_yhat.size(0), C = log_yhat.size(1);
      Tensor t, denom_t;  // the target rows (undefined: plain one-hot) and the mean's divisor
      Tensor valid;       // the rows not ignored (undefined: none can be)
      if (target.is_floating_point()) {  // class probabilities
        t = ls == 0 ? target : at::add(at::mul(target, 1 - ls), ls / C);
        if (weight.defined()) t = at::mul(t, weight);
      } else if (!plain_one_hot(target, weight, ignore_index, red, ls, count)) {
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
      if (!t.defined()) {  // plain one-hot: yhat - y
        Tensor minus_one = at::full({1, 1}, -1.0, yhat.options()).expand({m, 1});
        grad_z = at::mul(yhat.scatter_add(1, target.reshape({-1, 1}), minus_one), scale);
      } else {
        grad_z = at::mul(at::sub(at::mul(t.sum(1, true), yhat), t), scale);
        if (valid.defined() && red == 1) {
          // An ignored row contributes nothing, even when every row is ignored and the mean's
          // denominator is 0 (torch's gradient is then 0, not 0 * inf = NaN).
          grad_z = at::where(valid.unsqueeze(1), grad_z, at::zeros({}, grad_z.options()));
        }
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
    int64_t red = reduction_code(reduction);
    ctx->saved_data["reduction"] = red;
    ctx->save_for_backward(
        {z, y, weight.value_or(Tensor()), pos_weight.value_or(Tensor())});
    return at::binary_cross_entropy_with_logits(z, y, weight, pos_weight, red);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
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
    int64_t red = reduction_code(reduction);
    ctx->saved_data["reduction"] = red;
    ctx->save_for_backward({yhat, y});
    return at::mse_loss(yhat, y, red);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    variable_list saved = ctx->get_saved_variables();
    const Tensor &yhat = saved[0], &y = saved[1];
    const Tensor& grad = grad_out[0];
    Tensor scale = ctx->saved_data["reduction"].toInt() != 1 ? grad : at::div(grad, yhat.numel());
    Tensor delta_L = at::mul(at::mul(at::sub(yhat, y), 2), scale);
    return {ctx->needs_input_grad(0) ? delta_L : Tensor(),
            ctx->needs_input_grad(1) ? at::neg(delta_L) : Tensor(), Tensor()};
  }
};

}  // namespace manualbp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace manualbp;
  m.def("mlp", [](const Tensor& x, const OptTensor& target,
                  const std::vector<std::string>& activations,
                  const std::vector<OptTensor>& params, const std::vector<OptTensor>& feedback,
                  bool direct) {
    c10::List<bool> has_bias, has_feedback;
    std::vector<Tensor> defined, fb;
    for (size_t j = 0; j < params.size(); ++j) {
      if (j % 2) has_bias.push_back(params[j].has_value());
      if (params[j].has_value()) defined.push_back(*params[j]);
    }
    for (const auto& B : feedback) {
      has_feedback.push_back(B.has_value());
      if (B.has_value()) fb.push_back(*B);
    }
    TORCH_CHECK_VALUE(feedback.empty() || feedback.size() == activations.size(),
                      "manualbp native: expected one feedback entry per layer (",
                      activations.size(), "), got ", feedback.size());
    TORCH_CHECK_VALUE(direct || fb.size() == feedback.size(),
                      "manualbp native: a per-layer rule needs a feedback matrix for every layer");
    return MLPNode::apply(x, target, activations, has_bias, at::TensorList(defined),
                          has_feedback, direct, at::TensorList(fb));
  }, py::arg("x"), py::arg("target"), py::arg("activations"), py::arg("params"),
        py::arg("feedback") = std::vector<OptTensor>(), py::arg("direct") = false);
  m.def("linear_act", [](const Tensor& a_prev, const Tensor& W, const OptTensor& b,
                         const std::string& activation, const OptTensor& B) {
    bool grad = at::GradMode::is_enabled();
    bool need_W = W.requires_grad() || (B.has_value() && B->requires_grad());
    return LinearActNode::apply(a_prev, W, b, B, activation, grad && a_prev.requires_grad(),
                                grad && need_W);
  }, py::arg("a_prev"), py::arg("W"), py::arg("b"), py::arg("activation"),
        py::arg("B") = py::none());
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
  m.def("backprop", &backprop, py::arg("x"), py::arg("target"), py::arg("params"),
        py::arg("activations"), py::arg("accumulate"),
        py::arg("feedback") = std::vector<OptTensor>(), py::arg("direct") = false);
  m.def("floor_seconds", &floor_seconds);
}
