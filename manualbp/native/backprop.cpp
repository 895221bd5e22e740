// The per-layer step and the whole-network pass; see backprop.h and manualbp/backprop.py.
#include "backprop.h"

#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cmath>

namespace manualbp {

namespace {

constexpr int64_t kMean = 1;  // aten's reduction code for "mean"
constexpr int64_t kIgnoreIndex = -100;
constexpr double kSoftplusThreshold = 20.0;

// g' for the activations without a one-kernel delta (leaky_relu, elu, silu), as activations.py
// writes them: each Python operator is the aten op it dispatches to (1 - s is rsub, 1 + t is
// add(t, 1)).
Tensor g_prime(const Step& step, const Tensor& t) {
  switch (step.act) {
    case Act::silu: {  // sigma (1 + z (1 - sigma)); aten's silu_backward has no derivative
      Tensor s = at::sigmoid(t);
      return at::mul(s, at::add(at::mul(t, at::rsub(s, 1)), 1));
    }
    case Act::leaky_relu:  // a > 0 exactly when z > 0
      return at::where(at::gt(t, 0), 1.0, at::full_like(t, 0.01));
    case Act::elu:  // z <= 0: e^z = a + 1
      return at::clamp(at::add(t, 1), std::nullopt, 1.0);
    default:
      break;
  }
  TORCH_CHECK(false, "manualbp native: no g' for this activation");
}

}  // namespace

Step step_of(const std::string& name) {
  static const std::vector<std::pair<std::string, Act>> names = {
      {"identity", Act::identity}, {"sigmoid", Act::sigmoid},     {"logistic", Act::sigmoid},
      {"tanh", Act::tanh},         {"relu", Act::relu},           {"leaky_relu", Act::leaky_relu},
      {"elu", Act::elu},           {"softplus", Act::softplus},   {"silu", Act::silu},
      {"gelu", Act::gelu},         {"gelu_tanh", Act::gelu_tanh}};
  for (const auto& [known, act] : names) {
    if (known == name) {
      bool identity = act == Act::identity;
      bool from_output = act == Act::identity || act == Act::sigmoid || act == Act::tanh ||
                         act == Act::relu || act == Act::leaky_relu || act == Act::elu;
      return Step{act, identity, from_output, !identity && !from_output};
    }
  }
  TORCH_CHECK_VALUE(false, "manualbp native: unknown activation '", name, "'");
}

std::vector<Step> plan(const std::vector<std::string>& names) {
  std::vector<Step> steps;
  steps.reserve(names.size());
  for (const auto& name : names) steps.push_back(step_of(name));
  return steps;
}

Tensor g(const Step& step, const Tensor& z, bool inplace) {
  switch (step.act) {
    case Act::identity: return z;
    case Act::sigmoid: return inplace ? at::sigmoid_(const_cast<Tensor&>(z)) : at::sigmoid(z);
    case Act::tanh: return inplace ? at::tanh_(const_cast<Tensor&>(z)) : at::tanh(z);
    case Act::relu: return inplace ? at::relu_(const_cast<Tensor&>(z)) : at::relu(z);
    case Act::leaky_relu: return at::leaky_relu(z, 0.01);
    case Act::elu: return at::elu(z, 1.0);
    case Act::softplus: return at::softplus(z, 1.0, kSoftplusThreshold);
    case Act::silu: return at::silu(z);
    case Act::gelu: return at::gelu(z, "none");
    case Act::gelu_tanh: return at::gelu(z, "tanh");
  }
  TORCH_CHECK(false, "manualbp native: unknown activation");
}

Tensor delta_from(const Tensor& grad_a, const Tensor& t, const Step& step, bool inplace) {
  Tensor out = grad_a;  // a handle: the _out kernels below write into grad_a's storage
  switch (step.act) {
    case Act::identity:
      return grad_a;
    case Act::sigmoid:  // grad_a * a (1 - a) in one kernel
      return inplace ? at::sigmoid_backward_out(out, grad_a, t) : at::sigmoid_backward(grad_a, t);
    case Act::tanh:  // grad_a * (1 - a^2) in one kernel
      return inplace ? at::tanh_backward_out(out, grad_a, t) : at::tanh_backward(grad_a, t);
    case Act::relu:  // grad_a where a > 0, else 0
      return inplace ? at::threshold_backward_out(out, grad_a, t, 0)
                     : at::threshold_backward(grad_a, t, 0);
    case Act::softplus:  // g' from z, one kernel each (activations.py: _softplus_delta, ...)
      return inplace ? at::softplus_backward_out(out, grad_a, t, 1.0, kSoftplusThreshold)
                     : at::softplus_backward(grad_a, t, 1.0, kSoftplusThreshold);
    case Act::gelu:
      return inplace ? at::gelu_backward_out(out, grad_a, t, "none")
                     : at::gelu_backward(grad_a, t, "none");
    case Act::gelu_tanh:
      return inplace ? at::gelu_backward_out(out, grad_a, t, "tanh")
                     : at::gelu_backward(grad_a, t, "tanh");
    default:
      return inplace ? out.mul_(g_prime(step, t)) : at::mul(grad_a, g_prime(step, t));
  }
}

std::tuple<Tensor, Tensor, Tensor> layer_grads(const Tensor& delta, const Tensor& a_prev,
                                               const Tensor& down, bool need_a_prev, bool need_W,
                                               bool need_b, Probe* probe) {
  if (probe != nullptr) {  // the layer's per-example share
    probe->delta = delta;
    probe->a_prev = a_prev;
    if (probe->clip) need_W = need_b = false;
  }
  Tensor grad_a_prev, grad_W, grad_b;
  bool flat = delta.dim() == 2;
  if (need_a_prev) grad_a_prev = flat ? delta.mm(down) : delta.matmul(down);  // (*, n_in)
  if (need_W || need_b) {
    Tensor delta_2d = flat ? delta : delta.reshape({-1, delta.size(-1)});
    if (need_W) {
      Tensor rows = a_prev.dim() == 2 ? a_prev : a_prev.reshape({-1, a_prev.size(-1)});
      grad_W = delta_2d.t().mm(rows);  // (n_out, n_in) = delta^T a_prev
    }
    if (need_b) grad_b = delta_2d.sum(0);
  }
  return {grad_a_prev, grad_W, grad_b};
}

std::pair<std::vector<Tensor>, std::vector<Tensor>> forward_pass(
    Tensor a, const std::vector<Step>& steps, at::TensorList params, bool inplace) {
  std::vector<Tensor> outs, zs;
  outs.reserve(steps.size());
  zs.reserve(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const Tensor& b = params[2 * i + 1];
    Tensor z = at::linear(a, params[2 * i], b.defined() ? std::optional<Tensor>(b) : std::nullopt);
    a = g(steps[i], z, inplace && !steps[i].keeps_z);
    outs.push_back(a);
    zs.push_back(steps[i].keeps_z ? z : Tensor());
  }
  return {std::move(outs), std::move(zs)};
}

std::tuple<Tensor, Tensor, Tensor> softmax_ce_forward(const Tensor& z_L, const Tensor& y) {
  Tensor log_yhat = at::log_softmax(z_L, 1);
  auto [loss, count] = at::nll_loss_forward(log_yhat, y, std::nullopt, kMean, kIgnoreIndex);
  return {log_yhat, loss, count};
}

Tensor softmax_ce_delta(const Tensor& grad_loss, const Tensor& log_yhat, const Tensor& y,
                        const Tensor& count) {
  Tensor minus_y =
      at::nll_loss_backward(grad_loss, log_yhat, y, std::nullopt, kMean, kIgnoreIndex, count);
  return at::_log_softmax_backward_data(minus_y, log_yhat, 1, log_yhat.scalar_type());
}

std::pair<std::vector<Tensor>, Tensor> backward_pass(
    Tensor grad_a, bool own, const Tensor& x, std::vector<Tensor>& outs, std::vector<Tensor>& zs,
    const std::vector<Tensor>& weights, const std::vector<Step>& steps,
    const std::vector<bool>& needs, bool scratch, const std::vector<Tensor>& feedback,
    bool direct, std::vector<Probe>* probes) {
  const int64_t L = static_cast<int64_t>(steps.size());
  const bool per_layer = !feedback.empty() && !direct;
  std::vector<Tensor> grads(per_layer ? 3 * L : 2 * L);  // then Kolen-Pollack's grads of B
  Tensor delta_L;
  for (int64_t i = L - 1; i >= 0; --i) {  // layer i + 1 in the slides' numbering
    if (direct && i < L - 1) {  // DFA: the error comes straight from the output layer
      grad_a = delta_L.defined() ? delta_L.mm(feedback[i]) : Tensor();  // (m, n_i)
      own = scratch;
    }
    Tensor delta;
    if (grad_a.defined()) {  // delta = grad_a * g'(z)
      const Step& step = steps[i];
      delta = delta_from(grad_a, step.keeps_z ? zs[i] : outs[i], step, own);
    }
    grad_a.reset();
    outs[i].reset();  // a[i] and z[i] have served; a[i-1] is still needed below
    zs[i].reset();
    if (direct && i == L - 1) delta_L = delta;  // DFA's hidden layers read it
    if (!delta.defined()) continue;  // no gradient reached this layer
    const Tensor& a_prev = i > 0 ? outs[i - 1] : x;
    const bool need_B = per_layer && needs[1 + 2 * L + i];
    const bool need_down = direct ? (i == 0 && needs[0]) : (i > 0 || needs[0]);
    // the one per-layer step every path shares: grad_W = delta^T a_prev, grad_b = sum(delta),
    // dL/da[i-1] = delta W (or delta B[i] under a rule)
    auto [grad_a_prev, grad_W, grad_b] =
        layer_grads(delta, a_prev, per_layer ? feedback[i] : weights[i], need_down,
                    needs[1 + 2 * i] || need_B, needs[2 + 2 * i],
                    probes != nullptr && (*probes)[i].on ? &(*probes)[i] : nullptr);
    grad_a = std::move(grad_a_prev);
    grads[2 * i + 1] = std::move(grad_b);
    if (need_B) grads[2 * L + i] = grad_W;  // Kolen-Pollack: B gets W's update
    if (needs[1 + 2 * i]) grads[2 * i] = std::move(grad_W);
    own = scratch;
  }
  return {std::move(grads), std::move(grad_a)};
}

Tensor rows(const Tensor& t) { return t.dim() == 2 ? t : t.reshape({-1, t.size(-1)}); }

Tensor flat_target(const Tensor& t) { return t.dim() == 1 ? t : t.reshape(-1); }

std::vector<Tensor> defined_or_empty(const std::vector<std::optional<Tensor>>& params) {
  std::vector<Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(p.has_value() ? *p : Tensor());
  return out;
}

Step step_of(Act act) {
  static const char* names[] = {"identity", "sigmoid", "tanh", "relu", "leaky_relu",
                                "elu", "softplus", "silu", "gelu", "gelu_tanh"};
  return step_of(names[static_cast<int>(act)]);
}

namespace {

// MLP._backprop: forward, delta[L] = (yhat - y) / m, the recursion; no autograd anywhere.
// feedback, direct: the rule's, as backward_pass takes them (empty: backprop).
std::pair<std::vector<Tensor>, Tensor> backprop_grads(const Tensor& x, const Tensor& target,
                                                      const std::vector<Tensor>& params,
                                                      const std::vector<Step>& steps,
                                                      const std::vector<Tensor>& feedback,
                                                      bool direct,
                                                      std::vector<Probe>* probes = nullptr) {
  Tensor x2 = rows(x);
  Tensor y = flat_target(target);
  auto [outs, zs] = forward_pass(x2, steps, params, /*inplace=*/true);
  Tensor z_L = outs.back();
  if (steps.back().identity) outs.back() = Tensor();  // backward never reads a[L]
  auto [log_yhat, loss, count] = softmax_ce_forward(z_L, y);
  z_L.reset();  // a[L] and log yhat are done with once delta[L] exists
  Tensor delta_L = softmax_ce_delta(at::ones_like(loss), log_yhat, y, count);
  log_yhat.reset();
  std::vector<bool> needs = {false};
  std::vector<Tensor> weights;
  for (const auto& p : params) needs.push_back(p.defined() && p.requires_grad());
  if (!feedback.empty() && !direct) {  // which B want a gradient (Kolen-Pollack's)
    for (const auto& B : feedback) needs.push_back(B.defined() && B.requires_grad());
  }
  for (size_t i = 0; i < steps.size(); ++i) weights.push_back(params[2 * i]);
  auto [grads, unused] = backward_pass(std::move(delta_L), true, x2, outs, zs, weights, steps,
                                       needs, true, feedback, direct, probes);
  return {std::move(grads), loss};
}

// As backward() would: add g to p's .grad, or (accumulate=false, or none yet) replace it.
void set_grad(const Tensor& p, const Tensor& g, bool accumulate) {
  Tensor& grad = const_cast<Tensor&>(p).mutable_grad();
  if (!grad.defined() || !accumulate) {
    grad = g;
  } else {
    grad.add_(g);
  }
}

// backprop's step; with probes, a clipped layer's parameters get no gradient here and, with
// accumulate=false, an emptied .grad (the block puts the clipped one there).
Tensor backprop_step(const Tensor& x, const Tensor& target,
                     const std::vector<std::optional<Tensor>>& params,
                     const std::vector<std::string>& activations, bool accumulate,
                     const std::vector<std::optional<Tensor>>& feedback, bool direct,
                     std::vector<Probe>* probes) {
  at::NoGradGuard no_grad;
  std::vector<Tensor> ps = defined_or_empty(params);
  std::vector<Tensor> fb = defined_or_empty(feedback);
  std::vector<Tensor> grads;
  Tensor loss;
  {
    BelowAutograd below;
    std::tie(grads, loss) = backprop_grads(x, target, ps, plan(activations), fb, direct, probes);
  }
  const size_t P = ps.size();
  const bool clipped = probes != nullptr && !probes->empty() && probes->front().clip;
  for (size_t j = 0; j < P; ++j) {
    if (grads[j].defined()) {
      set_grad(ps[j], grads[j], accumulate);
    } else if (clipped && !accumulate && ps[j].defined() && ps[j].requires_grad()) {
      const_cast<Tensor&>(ps[j]).mutable_grad().reset();  // replaced by the block's
    }
  }
  for (size_t i = 0; i < grads.size() - P; ++i) {  // Kolen-Pollack's B: its own tensor
    Tensor g = grads[P + i];
    if (!g.defined()) continue;
    // a copy only where B.grad would become the tensor W.grad now is; B.grad.add_(g) reads g
    const bool adds = accumulate && fb[i].grad().defined();
    set_grad(fb[i], !adds && g.is_same(ps[2 * i].grad()) ? g.clone() : g, accumulate);
  }
  return loss;
}

}  // namespace

Tensor backprop(const Tensor& x, const Tensor& target,
                const std::vector<std::optional<Tensor>>& params,
                const std::vector<std::string>& activations, bool accumulate,
                const std::vector<std::optional<Tensor>>& feedback, bool direct) {
  return backprop_step(x, target, params, activations, accumulate, feedback, direct, nullptr);
}

std::pair<Tensor, std::vector<Tensor>> backprop_probed(
    const Tensor& x, const Tensor& target, const std::vector<std::optional<Tensor>>& params,
    const std::vector<std::string>& activations, bool accumulate,
    const std::vector<std::optional<Tensor>>& feedback, bool direct,
    const std::vector<bool>& probed, bool clip) {
  TORCH_CHECK_VALUE(probed.size() == activations.size(),
                    "manualbp native: expected one probe flag per layer (", activations.size(),
                    "), got ", probed.size());
  std::vector<Probe> probes(probed.size());
  for (size_t i = 0; i < probed.size(); ++i) probes[i] = Probe{probed[i], clip, {}, {}};
  Tensor loss =
      backprop_step(x, target, params, activations, accumulate, feedback, direct, &probes);
  std::vector<Tensor> shares;  // delta[1], a_prev[1], delta[2], ...
  for (auto& probe : probes) {
    shares.push_back(std::move(probe.delta));
    shares.push_back(std::move(probe.a_prev));
  }
  return {loss, std::move(shares)};
}

// The floor: no Python, no autograd, no .grad written.
double floor_seconds(const Tensor& x, const Tensor& target,
                     const std::vector<std::optional<Tensor>>& params,
                     const std::vector<std::string>& activations, int64_t reps) {
  at::NoGradGuard no_grad;
  BelowAutograd below;
  std::vector<Tensor> ps = defined_or_empty(params);
  std::vector<Step> steps = plan(activations);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) backprop_grads(x, target, ps, steps, {}, false);
  std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
  return dt.count() / static_cast<double>(reps);
}

}  // namespace manualbp
