// The slides' algorithm for a whole network, in C++: manualbp/backprop.py line for line.
//
//   forward:   z[i] = a[i-1] W[i]^T + b[i],  a[i] = g(z[i])                       i = 1..L
//   output:    delta[L] = (yhat - y) / m       (softmax output, mean cross-entropy)
//   backward:  grad_W[i]  = delta[i]^T a[i-1]
//              grad_b[i]  = sum(delta[i])
//              delta[i-1] = (delta[i] B[i]) * g'(z[i-1])     B[i] = W[i] for backprop
//
// Same aten kernels in the same order as the Python passes, so results are bit-identical.
// A learning rule (manualbp/rules.py) replaces W[i] in the last line by its B[i] or, for direct
// feedback alignment, sends every hidden layer delta[L] D[i]: backward_pass takes its matrices.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace manualbp {

using at::Tensor;

// Where no graph is being built (a node's forward, a backward without create_graph, the
// engine-free step), each op goes straight to its kernel instead of through autograd's and
// ADInplaceOrView's dispatch layers first: the same kernels, so the same bits, ~0.5 us less a
// call. Not around writes to .grad (an in-place add there must still bump its version).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

enum class Act { identity, sigmoid, tanh, relu, leaky_relu, elu, softplus, silu, gelu, gelu_tanh };

// One layer's activation as the passes need it (backprop.py: Step).
struct Step {
  Act act;
  bool identity;     // g' = 1
  bool from_output;  // g' reads a (else z)
  bool keeps_z;      // g' needs z, so the forward keeps it
};

Step step_of(const std::string& name);
Step step_of(Act act);
std::vector<Step> plan(const std::vector<std::string>& names);

// a = g(z); inplace: g may overwrite z (a fresh z nothing else reads; relu, tanh, sigmoid only).
Tensor g(const Step& step, const Tensor& z, bool inplace);

// delta = grad_a * g'(t), t = a or z as the step says (linear.py: delta_from).
// inplace: grad_a is a scratch tensor of ours, free to overwrite.
Tensor delta_from(const Tensor& grad_a, const Tensor& t, const Step& step, bool inplace);

// A layer's per-example probe (manualbp.per_example's _Call): layer_grads hands it the layer's
// (delta, a_prev). clip: DP-SGD clipping, so grad_W and grad_b are not formed here: the block
// forms them once every layer's norm is known.
struct Probe {
  bool on = false;  // this layer is probed
  bool clip = false;
  Tensor delta, a_prev;
};

// (grad_a_prev, grad_W, grad_b) from delta (linear.py: layer_grads), each undefined where not
// wanted. down: the matrix the error goes down through (W for backprop). probe: this layer's,
// or nullptr.
std::tuple<Tensor, Tensor, Tensor> layer_grads(const Tensor& delta, const Tensor& a_prev,
                                               const Tensor& down, bool need_a_prev, bool need_W,
                                               bool need_b, Probe* probe = nullptr);

// a[1..L] and z[1..L] (undefined where g' does not need z) from a[0] (m, n_0).
// params: W1, b1, ..., WL, bL (an undefined b: no bias).
std::pair<std::vector<Tensor>, std::vector<Tensor>> forward_pass(
    Tensor a, const std::vector<Step>& steps, at::TensorList params, bool inplace);

// (log yhat, mean cross-entropy, count of targets not ignored), as F.cross_entropy.
std::tuple<Tensor, Tensor, Tensor> softmax_ce_forward(const Tensor& z_L, const Tensor& y);

// delta[L] = (yhat - y) * grad_loss / count, in the two kernels autograd runs.
Tensor softmax_ce_delta(const Tensor& grad_loss, const Tensor& log_yhat, const Tensor& y,
                        const Tensor& count);

// Every grad_W[i], grad_b[i] (flat: W1, b1, ...) and dL/dx, by the recursion.
// grad_a: dL/da[L]; own: it is a temporary of ours. outs, zs: as forward_pass gives them (a[L]
// may be undefined when the output layer's g' does not read it); both are consumed.
// weights: W[1..L]. needs: dL/dx wanted, then per parameter W1, b1, ... whether it is wanted.
// scratch: no graph is being built.
// feedback: a learning rule's matrix per layer (empty: backprop, W throughout).
//   direct=false: B[i] shaped like W[i]; dL/da[i-1] = delta[i] B[i]. needs then also holds,
//   after the 2L parameters, whether each B[i] wants a gradient (Kolen-Pollack's is grad_W[i]),
//   and grads grows by those L entries.
//   direct=true (DFA): D[i] (n_L, n_i) for each hidden layer (undefined for the output layer);
//   dL/da[i] = delta[L] D[i], all from delta[L] alone, and only dL/dx still uses W[1].
// probes: per layer, a per-example probe (Probe::on) or nullptr for none.
std::pair<std::vector<Tensor>, Tensor> backward_pass(
    Tensor grad_a, bool own, const Tensor& x, std::vector<Tensor>& outs, std::vector<Tensor>& zs,
    const std::vector<Tensor>& weights, const std::vector<Step>& steps,
    const std::vector<bool>& needs, bool scratch, const std::vector<Tensor>& feedback = {},
    bool direct = false, std::vector<Probe>* probes = nullptr);

// (*, n) as (m, n): every leading dim is an example.
Tensor rows(const Tensor& t);

// A target (*) as (m,): a 1-D one as it is (a reshape would still cost a view op).
Tensor flat_target(const Tensor& t);

// W1, b1, ... with an undefined Tensor for each None.
std::vector<Tensor> defined_or_empty(const std::vector<std::optional<Tensor>>& params);

// MLP.backprop's step with no autograd at all: forward, delta[L] = (yhat - y) / m, the
// recursion, each gradient added to (or, accumulate=false, put in) its parameter's .grad.
// feedback, direct: the rule's matrices as backward_pass takes them (empty: backprop);
// Kolen-Pollack's B get grad_W in .grad too, each as its own tensor. Returns the mean
// cross-entropy.
Tensor backprop(const Tensor& x, const Tensor& target,
                const std::vector<std::optional<Tensor>>& params,
                const std::vector<std::string>& activations, bool accumulate,
                const std::vector<std::optional<Tensor>>& feedback, bool direct);

// backprop inside a per-example block: probed[i] says which layers the block covers, clip
// whether it clips (their grad_W, grad_b are then left to the block, and with accumulate=false
// their .grad is emptied for it, as mlp.py does). Returns the loss and, per layer, delta and
// a_prev (undefined where the layer is not probed or no gradient reached it).
std::pair<Tensor, std::vector<Tensor>> backprop_probed(
    const Tensor& x, const Tensor& target, const std::vector<std::optional<Tensor>>& params,
    const std::vector<std::string>& activations, bool accumulate,
    const std::vector<std::optional<Tensor>>& feedback, bool direct,
    const std::vector<bool>& probed, bool clip);

// Seconds per call of backprop's kernels run `reps` times back to back (the benchmark's floor).
double floor_seconds(const Tensor& x, const Tensor& target,
                     const std::vector<std::optional<Tensor>>& params,
                     const std::vector<std::string>& activations, int64_t reps);

}  // namespace manualbp
