// torch::autograd::Functions over the pass in backprop.cpp, and the engine-free step: the
// C++ twins of MLPEagerFunction (fused.py), LinearActEagerFunction (linear.py) and MLP.backprop
// (mlp.py); the loss nodes are in losses.cpp. Same saved tensors, same kernels, same order.
#include <ATen/SavedTensorHooks.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>  // get_current_graph_task_keep_graph
#include <torch/csrc/utils/pybind.h>

#include <mutex>
#include <unordered_map>

#include "backprop.h"

namespace manualbp {

void bind_losses(py::module_& m);  // losses.cpp
void bind_per_example(py::module_& m);  // per_example.cpp
void bind_sign_feedback(py::module_& m);  // sign_feedback.cpp
void bind_dispatch(py::module_& m);  // dispatch.cpp
std::pair<Tensor, Tensor> early_share(const Tensor& delta, const Tensor& a_prev, int64_t batch,
                                      bool W, bool b);  // per_example.cpp
void drop_early_grams();  // per_example.cpp

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

// The per-example shares the autograd nodes hand back to manualbp.per_example: the block opens
// a slot for each covered layer call it sends to a node, the node's backward fills it with that
// layer's (delta, a_prev) (linear.py: a probe's call from layer_grads) and, for a (B, T, n)
// share, its part of the norm while delta and a_prev are in cache (per_example.cpp's
// early_share, the probe's in Python), and the block takes it when it finishes. A node whose
// slot is closed (its block is over) fills nothing.
namespace {
struct Slot {
  int64_t batch = 0;  // the call's B (dim 0 of its input)
  bool W = false, b = false;  // which of the layer's parameters the block covers
  bool drop = false;  // once sq and dsum are formed, let delta and a_prev go (_Call.drop)
  bool dropped = false;
  bool twice = false;  // a second backward reached the call (one forward, two backwards)
  std::vector<Tensor> shares;  // delta, a_prev, sq, dsum once filled
};
std::mutex slots_mutex;
std::unordered_map<int64_t, Slot> slots;

void fill(int64_t slot, const Probe& probe) {
  if (slot < 0 || !probe.delta.defined()) return;  // not covered, or no gradient reached it
  std::lock_guard<std::mutex> lock(slots_mutex);
  auto it = slots.find(slot);
  if (it == slots.end()) return;
  Slot& s = it->second;
  s.twice = s.twice || !s.shares.empty();  // the block refuses it (per_example.py: _finish)
  auto [sq, dsum] = early_share(probe.delta, probe.a_prev, s.batch, s.W, s.b);
  s.dropped = s.drop && (sq.defined() || dsum.defined());  // a (B, T, n) share: parts formed
  if (s.dropped) {
    s.shares = {Tensor(), Tensor(), sq, dsum};
  } else {
    s.shares = {probe.delta, probe.a_prev, sq, dsum};
  }
}
}  // namespace

void open_slot(int64_t slot, int64_t batch, bool W, bool b, bool drop) {
  std::lock_guard<std::mutex> lock(slots_mutex);
  // a forward after a backward starts a new pass, whose inputs may sit in the memory of the
  // last one's (a buffer written over in place): its A A^T are not for this pass (as Python's)
  drop_early_grams();
  slots[slot] = Slot{batch, W, b, drop, false, {}};
}

// Keep the slot's delta and a_prev when it is filled (another call of the layer stacks with
// it); true when a backward already let them go.
bool keep_slot(int64_t slot) {
  std::lock_guard<std::mutex> lock(slots_mutex);
  auto it = slots.find(slot);
  if (it == slots.end()) return false;
  it->second.drop = false;
  return it->second.dropped;
}

// ((delta, a_prev, sq, dsum), twice): each share undefined where not formed (all four when no
// backward reached the layer), and whether a second backward reached it; the slot is closed,
// and with the last one the backward's Grams are let go.
std::pair<std::vector<Tensor>, bool> take_slot(int64_t slot) {
  std::lock_guard<std::mutex> lock(slots_mutex);
  auto it = slots.find(slot);
  std::vector<Tensor> shares(4);
  bool twice = false;
  if (it != slots.end()) {
    if (!it->second.shares.empty()) shares = std::move(it->second.shares);
    twice = it->second.twice;
    slots.erase(it);
  }
  if (slots.empty()) drop_early_grams();
  return {std::move(shares), twice};
}

// logits[, loss] for x (*, n_0): MLPEagerFunction's forward and backward.
// has_feedback, direct, feedback: a learning rule's matrices (rules.split's), the defined ones
// (DFA's output layer has none) and which layers hold one; all empty for backprop.
struct MLPNode : torch::autograd::Function<MLPNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& target,
                               const std::vector<std::string>& activations,
                               const c10::List<bool>& has_bias, at::TensorList defined,
                               const c10::List<bool>& has_feedback, bool direct,
                               at::TensorList feedback, const std::vector<int64_t>& probe_slots,
                               bool clip) {
    // the saved target: a view of the user's (a 1-D one is itself), made here so that it shares
    // their version counter and an in-place change before backward is caught
    Tensor y = target.has_value() ? flat_target(*target) : Tensor();
    std::vector<Step> steps = plan(activations);
    std::vector<Tensor> params = with_gaps(defined, has_bias);
    std::vector<Tensor> outs, zs;
    Tensor log_yhat, loss, count;
    {
      BelowAutograd below;  // apply runs forward in no-grad mode
      std::tie(outs, zs) = forward_pass(rows(x), steps, params, /*inplace=*/true);
      if (y.defined()) std::tie(log_yhat, loss, count) = softmax_ce_forward(outs.back(), y);
    }
    Tensor a_L = outs.back();
    Tensor logits = a_L;
    if (x.dim() != 2) {  // a view that shares a[L]'s version counter
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
      shape.push_back(a_L.size(-1));
      logits = a_L.reshape(shape);
    }
    ctx->saved_data["steps"] = codes(activations);
    ctx->saved_data["bias"] = has_bias;
    ctx->saved_data["feedback"] = has_feedback;
    ctx->saved_data["direct"] = direct;
    if (!probe_slots.empty()) {  // a per_example block covers some layers
      ctx->saved_data["slots"] = probe_slots;
      ctx->saved_data["clip"] = clip;
    }
    ctx->set_materialize_grads(false);
    if (steps.back().identity || steps.back().keeps_z) outs.back() = Tensor();
    // a[1..L-1], z[1..L] and log yhat are the node's own (no one else sees them, so nothing
    // can change them in place): held outside save_for_backward, the backward lets each go once
    // it has served, as autograd's per-op nodes do, instead of all at its end. With saved-tensor
    // hooks (save_on_cpu, ...) set, they go through save_for_backward so that the hooks see them.
    // (the hook stack itself: get_hooks' return type differs across torch 2.x)
    if (at::SavedTensorDefaultHooks::get_tls_state().stack.empty()) {
      c10::List<Tensor> inner;
      for (size_t i = 0; i < outs.size(); ++i) {
        inner.push_back(i + 1 < outs.size() ? std::exchange(outs[i], Tensor()) : Tensor());
      }
      for (auto& z : zs) inner.push_back(std::exchange(z, Tensor()));
      inner.push_back(std::exchange(log_yhat, Tensor()));
      ctx->saved_data["inner"] = std::move(inner);
    }
    variable_list saved = {x, Tensor(), Tensor(), Tensor()};
    variable_list result = {logits};
    if (y.defined()) {
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

  // grad_out by reference: the engine's list, which nothing reads once this returns, so that
  // dL/da[L] can go once layer L has used it (a copy would keep it to the end, as autograd's
  // per-op nodes do not)
  template <class Grads>
  static variable_list backward(AutogradContext* ctx, Grads&& grad_out) {
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
    const Tensor x = saved[0], y = saved[1], count = saved[3];  // saved is let go below
    Tensor log_yhat = saved[2];
    std::vector<Tensor> params =
        with_gaps(at::TensorList(saved.data() + 4, P), has_bias);
    std::vector<Tensor> outs(saved.begin() + 4 + P, saved.begin() + 4 + P + L);
    std::vector<Tensor> zs(saved.begin() + 4 + P + L, saved.begin() + 4 + P + 2 * L);
    std::vector<Tensor> feedback;  // per layer, undefined where a layer has none
    size_t k = 4 + P + 2 * L;
    for (bool has : has_feedback) feedback.push_back(has ? saved[k++] : Tensor());
    auto inner = ctx->saved_data.find("inner");
    if (inner != ctx->saved_data.end()) {  // a[1..L-1], z[1..L], log yhat, held out of saving
      c10::List<Tensor> held = inner->second.toTensorList();
      for (size_t i = 0; i + 1 < L; ++i) outs[i] = held.get(i);
      for (size_t i = 0; i < L; ++i) zs[i] = held.get(L + i);
      log_yhat = held.get(2 * L);
      // no retain_graph: this backward is their last reader, and backward_pass lets each go
      // once it has served (a second backward is refused before it gets here)
      if (!torch::autograd::get_current_graph_task_keep_graph()) ctx->saved_data.erase(inner);
    }
    saved.clear();  // outs, zs, params, ... hold what is still needed
    Tensor x2 = rows(x);
    bool scratch = !at::GradMode::is_enabled();
    std::optional<BelowAutograd> below;
    if (scratch) below.emplace();  // no create_graph: no graph to record
    if (!scratch) {  // create_graph: rebuild a[i], z[i] as functions of x and the weights
      std::tie(outs, zs) = forward_pass(x2, steps, params, false);
      if (log_yhat.defined()) log_yhat = at::log_softmax(outs.back(), 1);
    }
    Tensor grad_a;
    bool own = false;
    if (grad_out[0].defined()) grad_a = rows(std::exchange(grad_out[0], Tensor()));
    if (grad_out.size() > 1 && grad_out[1].defined()) {
      Tensor delta_L = softmax_ce_delta(grad_out[1], log_yhat, y, count);
      log_yhat.reset();  // served
      grad_a = grad_a.defined() ? grad_a + delta_L : delta_L;
      own = scratch;
    }
    // x, target, activations, has_bias, the given parameters, has_feedback, direct, feedback,
    // probe_slots, clip
    variable_list result(4 + P + 2 + F + 2);
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
    std::vector<int64_t> probe_slots;  // per layer, its per-example slot or -1
    std::vector<Probe> probes;
    if (ctx->saved_data.count("slots")) {
      probe_slots = ctx->saved_data["slots"].toIntVector();
      const bool clip = ctx->saved_data["clip"].toBool();
      for (int64_t slot : probe_slots) probes.push_back(Probe{slot >= 0, clip, {}, {}});
    }
    auto [grads, grad_x] = backward_pass(std::move(grad_a), own, x2, outs, zs, weights, steps,
                                         needs, scratch, feedback, direct,
                                         probes.empty() ? nullptr : &probes);
    for (size_t i = 0; i < probes.size(); ++i) fill(probe_slots[i], probes[i]);
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
                        bool need_a_prev, bool need_W, int64_t slot, bool clip) {
    BelowAutograd below;  // apply runs forward in no-grad mode
    Step step = step_of(activation);
    Tensor z = at::linear(a_prev, W, b);  // (*, n_out)
    ctx->saved_data["act"] = static_cast<int64_t>(step.act);
    if (slot >= 0) {  // a per_example block covers this call
      ctx->saved_data["slot"] = slot;
      ctx->saved_data["clip"] = clip;
    }
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
    variable_list result(9);  // a_prev, W, b, B, activation, need_a_prev, need_W, slot, clip
    if (!grad_a.defined()) return result;
    std::optional<BelowAutograd> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // no create_graph: no graph to record
    if (step.keeps_z && !below) t = at::linear(a_prev, W, opt(saved[2]));
    Tensor delta = step.identity ? grad_a : delta_from(grad_a, t, step, false);
    // edges: a_prev, W, then b and B where given
    bool need_W = ctx->needs_input_grad(1);
    bool need_B = has_B && ctx->needs_input_grad(has_bias ? 3 : 2);
    const Tensor& down = step.keeps_z && has_B ? saved[4] : W;  // saved as `down` otherwise
    const int64_t slot = ctx->saved_data.count("slot") ? ctx->saved_data["slot"].toInt() : -1;
    Probe probe{slot >= 0, slot >= 0 && ctx->saved_data["clip"].toBool(), {}, {}};
    auto [grad_a_prev, grad_W, grad_b] =
        layer_grads(delta, a_prev, down, ctx->needs_input_grad(0), need_W || need_B,
                    has_bias && ctx->needs_input_grad(2), probe.on ? &probe : nullptr);
    fill(slot, probe);
    result[0] = grad_a_prev;
    result[1] = need_W ? grad_W : Tensor();
    result[2] = grad_b;
    result[3] = need_B ? grad_W : Tensor();
    return result;
  }
};

}  // namespace manualbp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace manualbp;
  m.def("mlp", [](const Tensor& x, const OptTensor& target,
                  const std::vector<std::string>& activations,
                  const std::vector<OptTensor>& params, const std::vector<OptTensor>& feedback,
                  bool direct, const std::vector<int64_t>& probe_slots, bool clip) {
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
    TORCH_CHECK_VALUE(probe_slots.empty() || probe_slots.size() == activations.size(),
                      "manualbp native: expected one probe slot per layer (",
                      activations.size(), "), got ", probe_slots.size());
    return MLPNode::apply(x, target, activations, has_bias, at::TensorList(defined),
                          has_feedback, direct, at::TensorList(fb), probe_slots, clip);
  }, py::arg("x"), py::arg("target"), py::arg("activations"), py::arg("params"),
        py::arg("feedback") = std::vector<OptTensor>(), py::arg("direct") = false,
        py::arg("probe_slots") = std::vector<int64_t>(), py::arg("clip") = false);
  m.def("linear_act", [](const Tensor& a_prev, const Tensor& W, const OptTensor& b,
                         const std::string& activation, const OptTensor& B, int64_t slot,
                         bool clip) {
    bool grad = at::GradMode::is_enabled();
    bool need_W = W.requires_grad() || (B.has_value() && B->requires_grad());
    return LinearActNode::apply(a_prev, W, b, B, activation, grad && a_prev.requires_grad(),
                                grad && need_W, slot, clip);
  }, py::arg("a_prev"), py::arg("W"), py::arg("b"), py::arg("activation"),
        py::arg("B") = py::none(), py::arg("slot") = -1, py::arg("clip") = false);
  m.def("open_slot", &open_slot, py::arg("slot"), py::arg("batch"), py::arg("W"), py::arg("b"),
        py::arg("drop"));
  m.def("keep_slot", &keep_slot);
  m.def("take_slot", &take_slot);
  bind_losses(m);
  bind_per_example(m);
  bind_sign_feedback(m);
  bind_dispatch(m);
  m.def("backprop", &backprop, py::arg("x"), py::arg("target"), py::arg("params"),
        py::arg("activations"), py::arg("accumulate"),
        py::arg("feedback") = std::vector<OptTensor>(), py::arg("direct") = false);
  m.def("backprop_probed", &backprop_probed, py::arg("x"), py::arg("target"), py::arg("params"),
        py::arg("activations"), py::arg("accumulate"), py::arg("feedback"), py::arg("direct"),
        py::arg("probed"), py::arg("clip"));
  m.def("floor_seconds", &floor_seconds);
}
