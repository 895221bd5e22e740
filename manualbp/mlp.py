"""manualbp.MLP: a fully connected network trained by one hand-written backward pass."""

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manualbp.activations import check_activation
from manualbp.apply import apply, autocast_dtype, c_apply, cast_all, tracing
from manualbp.backprop import (
    backward_pass,
    forward_pass,
    plan,
    softmax_ce_delta,
    softmax_ce_forward,
)
from manualbp.fused import MLPEagerFunction, MLPFunction, Trace
from manualbp.linear import check_linear_args
from manualbp.loss_checks import check_mlp_target, explain_mlp_target
from manualbp.mlp_checks import check_bias_shapes, check_layer, check_layers, check_sizes
from manualbp.modules import Linear
from manualbp.native import eager as _native
from manualbp.native import lib as _native_lib
from manualbp.native import serves as _native_serves
from manualbp.per_example import active
from manualbp.rules import DFA, DIRECT, PER_LAYER, attach, check_rule, feedback_of

_EAGER_DTYPES = (torch.float32, torch.float64)
_is_compiling = torch.compiler.is_compiling
_NO_CONTEXT = contextlib.nullcontext()
_eager_apply = c_apply(MLPEagerFunction)


class MLP(nn.Module):
    """Fully connected network a[i] = g(a[i-1] W[i]^T + b[i]) with the fused backward.

    Hidden layers use `activation`; the last layer is linear and returns logits, for a softmax
    or logistic output in the loss. sizes=[n_in, n_out] is the slides' single layer of neurons:
    logistic/softmax regression. The whole stack is one autograd node (MLPFunction), and
    `loss(x, y)` folds the softmax cross-entropy output layer into that node too.

    Args:
        sizes: layer widths [n_0, n_1, ..., n_L], at least two, each > 0.
        activation: name in manualbp.ACTIVATIONS for the hidden layers (default "relu").
        bias: give every layer a bias (default True).
        device, dtype: factory kwargs for the parameters.
        rule: how the error goes down (manualbp.rules): "backprop" (default),
            "feedback_alignment", "sign_symmetry", "kolen_pollack" (each layer's B replaces its
            W; see manualbp.Linear) or "direct_feedback_alignment" ("dfa": each hidden layer i
            gets delta[i] = (delta[L] D[i]) * g'(z[i]), D[i] a fixed random (n_L, n_i) buffer
            `layers.{i}.feedback`). Every forward path and backprop() follow it.

    Attributes:
        layers: nn.ModuleList of L manualbp.Linear (state_dict keys layers.{i}.weight/.bias),
            initialised exactly as nn.Linear would be under the same seed; a rule's feedback
            matrices are drawn after all of them, so the weights are the same for every rule.
        rule: the rule's full name.
    """

    def __init__(self, sizes, activation: str = "relu", bias: bool = True, device=None,
                 dtype=None, rule: str = "backprop") -> None:
        super().__init__()
        sizes = check_sizes(sizes)
        self.sizes = sizes
        self.activation = check_activation(activation, "MLP")
        self.rule = rule = check_rule(rule, "MLP")
        acts = [activation] * (len(sizes) - 2) + ["identity"]
        self.layers = nn.ModuleList(
            Linear(n_in, n_out, bias=bias, activation=act, device=device, dtype=dtype)
            for n_in, n_out, act in zip(sizes[:-1], sizes[1:], acts, strict=True)
        )
        L = len(self.layers)
        for i, layer in enumerate(self.layers):
            attach(layer, rule, sizes[-1] if rule == DFA and i < L - 1 else None)

    def forward(self, x: Tensor, trace: Trace | None = None) -> Tensor:
        """Logits a[L], shape (*, n_L), for x of shape (*, n_0)."""
        return self._run(x, None, trace)[0]

    def loss(self, x: Tensor, target: Tensor, trace: Trace | None = None) -> tuple[Tensor, Tensor]:
        """(mean softmax cross-entropy, logits) with delta[L] = (yhat - y) / m folded in.

        Same value and gradients as F.cross_entropy(self(x), target), in one autograd node.

        Args:
            x: (*, n_0). target: class indices of shape (*), each in [0, n_L), or -100 to leave
                that example out of the mean (F.cross_entropy's default ignore_index).
        """
        target = check_mlp_target(x, target)
        try:
            logits, loss = self._run(x, target, trace)
        except IndexError as error:  # the loss kernel refused a class index
            refused = error
        else:
            return loss, logits
        explain_mlp_target("MLP.loss", target, self.sizes[-1])  # say which, and why
        raise refused

    def backprop(self, x: Tensor, target: Tensor, accumulate: bool = True) -> Tensor:
        """The slides' training pass with no autograd at all: forward, delta[L] = (yhat - y) / m,
        the delta recursion, and each parameter's gradient added to its .grad.

        Gives the gradients of `self.loss(x, target)[0].backward()` (the mean softmax
        cross-entropy) without building a graph, so a step costs less; pair it with any
        torch.optim optimizer. Differentiates the parameters only (x.grad is left alone), skips
        parameters with requires_grad=False, and follows autocast like loss().
        DistributedDataParallel averages gradients in autograd hooks, which this pass never
        triggers: under DDP use loss().

        Args:
            x: (*, n_0). target: class indices of shape (*), as loss() takes them.
            accumulate: add to .grad, as backward() does (default); False replaces .grad, so
                no zero_grad() is needed between steps.

        Returns:
            the loss, detached.
        """
        target = check_mlp_target(x, target, "MLP.backprop")
        params, activations = self._flat()
        check_linear_args("MLP.backprop", x, params[0], params[1])
        check_bias_shapes("MLP.backprop", params)
        feedback, source = self._feedback()
        dtype = autocast_dtype(x)
        pe = active()  # a per_example block: the pass hands each layer's share to its probe
        node = None if pe is None else pe.node_probes(self.layers, x, traced_ok=True)
        probes = None if node is None else node.probes
        # the C++ step serves every rule and the per-example probes on leaf parameters; a
        # parametrized weight's gradient must go on through autograd (below)
        leaves = all(p is None or p.grad_fn is None for p in params)
        lib = _native(x) if dtype is None and leaves and _native_serves(self) else None
        with torch.no_grad() if lib is None else _NO_CONTEXT:  # C++ turns grad mode off itself
            try:
                if lib is not None:  # the same pass in C++; it writes .grad itself (B's too)
                    if probes is None:
                        return lib.backprop(x, target, params, activations, accumulate,
                                            feedback or (), source == DIRECT)
                    return _native_probed(lib, x, target, params, activations, accumulate,
                                          feedback, source, probes, pe.clip)
                if dtype is None:
                    grads, loss = self._backprop(x, target, params, activations, params,
                                                 probes, feedback=feedback, source=source)
                else:
                    x, *weights = cast_all(dtype, x, *params)
                    fb = None if feedback is None else cast_all(dtype, *feedback)
                    with torch.autocast(x.device.type, enabled=False):
                        grads, loss = self._backprop(x, target, weights, activations, params,
                                                     probes, feedback=fb, source=source)
            except IndexError as error:  # the loss kernel refused a class index
                refused = error
            except RuntimeError as error:  # a layer's kernel refused: say which layer
                check_layers("MLP.backprop", params)
                raise error from None
            else:
                refused = None
        if refused is not None:
            explain_mlp_target("MLP.backprop", target, self.sizes[-1])  # say which, and why
            raise refused
        if source == PER_LAYER:  # Kolen-Pollack's B get grad_W: a copy only where B.grad and
            L = len(activations)  # W.grad would both become that tensor (as the C++ step)
            params = params + list(feedback)
            grads = grads[:2 * L] + [
                g.clone() if g is not None and g is grads[2 * i]
                and _both_take(params[2 * i], B, accumulate) else g
                for i, (g, B) in enumerate(zip(grads[2 * L:], feedback, strict=True))]
        computed = []  # (weight computed by a parametrization, its gradient)
        clipped = probes is not None and pe.clip  # the block forms their .grad when it exits
        for p, g in zip(params, grads, strict=True):  # .grad never requires grad: no graph
            if g is None:
                if clipped and not accumulate and p is not None and p.requires_grad:
                    p.grad = None  # replaced, as accumulate=False says, by the block's
                continue
            if g.dtype != p.dtype:
                g = g.to(p.dtype)
            if p.grad_fn is not None:  # not a leaf: the gradient belongs to what p is made of
                computed.append((p, g))
            else:
                _set_grad(p, g, accumulate)
        if computed:
            self._through_parametrizations(computed, accumulate)
        return loss

    def _through_parametrizations(self, computed, accumulate: bool) -> None:
        """Carry dL/dW on to the parameters a parametrization computes W from (weight_norm's g
        and v, orthogonal's original, a user's own), by autograd through the parametrization
        alone: the chain rule gives exactly what loss().backward() leaves in their .grad."""
        leaves = [q for layer in self.layers if parametrize.is_parametrized(layer)
                  for q in layer.parametrizations.parameters() if q.requires_grad]
        tensors, grads = zip(*computed, strict=True)
        leaf_grads = torch.autograd.grad(tensors, leaves, grads, allow_unused=True)
        for q, g in zip(leaves, leaf_grads, strict=True):
            if g is not None:
                _set_grad(q, g, accumulate)

    def _backprop(self, x: Tensor, target: Tensor, weights, activations, params,
                  probes=None, feedback=None, source=None):
        """(grads W1, b1, ..., loss) by the shared pass, in weights' dtype; no grad mode, no
        autocast here. params: the parameters themselves, for which ones want a gradient.
        probes: per layer, a per_example probe or None; feedback, source: the rule's, as
        _feedback gives them (grads then as backward_pass's)."""
        steps = plan(activations)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = target.reshape(-1)
        outs, zs = forward_pass(x2, steps, weights, inplace=True)
        z_L = outs[-1]
        dtype = z_L.dtype
        if steps[-1].g is None:
            outs[-1] = None  # identity output layer: backward never reads a[L]
        log_yhat, loss, count = softmax_ce_forward(
            z_L if z_L.element_size() >= 4 else z_L.float(), y)
        del z_L  # a[L] and log yhat are done with once delta[L] exists: free them before the
        delta_L = softmax_ce_delta(torch.ones_like(loss), log_yhat, y, count)  # recursion
        del log_yhat
        if delta_L.dtype != dtype:
            delta_L = delta_L.to(dtype)
        needs = (False, *(p is not None and p.requires_grad for p in params))
        if source == PER_LAYER:  # which B want a gradient (Kolen-Pollack's)
            needs += tuple(isinstance(B, nn.Parameter) and B.requires_grad
                           for B in self._own_feedback())
        grads, _ = backward_pass(delta_L, True, x2, outs, zs, weights[0::2], steps, needs,
                                 scratch=True, probes=probes, feedback=feedback,
                                 direct=source == DIRECT)
        return grads, loss

    def _own_feedback(self) -> list:
        return [layer._parameters.get("feedback", layer._buffers.get("feedback"))
                for layer in self.layers]

    def _feedback(self):
        """(feedback matrix per layer, source) for the rule; (None, None) for backprop."""
        if self.rule == "backprop":
            return None, None
        if self.rule == DFA:
            return self._own_feedback(), DIRECT
        return [feedback_of(layer) for layer in self.layers], PER_LAYER

    def zero_grad(self, set_to_none: bool = True) -> None:
        """nn.Module.zero_grad, as a loop over the layers' own parameters: the generic walk over
        named_parameters() costs 18-35 us a call here, a tenth of a small training step."""
        if not set_to_none or self._parameters or len(self._modules) != 1:
            return super().zero_grad(set_to_none)  # set_to_none=False, a subclass's modules
        for layer in self._modules["layers"]._modules.values():
            if layer._modules:  # parametrized layers, ...: the generic walk (clears all again)
                return super().zero_grad(set_to_none)
            for p in layer._parameters.values():
                if p is not None:
                    p.grad = None

    def _flat(self) -> tuple[list[Tensor | None], tuple[str, ...]]:
        """[W1, b1, ..., WL, bL] and the activation names, read from the layers each call (so a
        parameter replaced, frozen or cast, a hook or a parametrization added, shows at once).
        Every read is direct: nn.Module.__getattr__ (self.layers, layer.weight) costs ~0.6 us
        a read, ModuleList.__iter__ ~0.3 us; this walk then costs ~0.8 us for three layers."""
        params: list[Tensor | None] = []
        activations = []
        i = 0
        for layer in self._modules["layers"]._modules.values():
            own = layer._parameters
            W = own.get("weight")
            if W is None:  # a parametrization's property (computed here, once per call)
                W = layer.weight
                check_layer(i, layer, W)
            elif (layer._forward_pre_hooks or layer._forward_hooks or layer._backward_hooks
                  or layer._backward_pre_hooks):
                check_layer(i, layer, W)
            params.append(W)
            params.append(own["bias"] if "bias" in own else layer.bias)
            activations.append(layer.activation)
            i += 1
        return params, tuple(activations)

    def _run(self, x: Tensor, target: Tensor | None, trace: Trace | None):
        """(logits, loss or None) as one node (run_node), with the rule's matrices; on a
        kernel's refusal, say which layer is at fault."""
        # native mlp_flat confirms the usual call in C++, else the Python decides (and explains);
        # torch.compile traces the Python (a C++ call there is a graph break)
        lib = None if _is_compiling() else _native_lib()
        flat = lib.mlp_flat(self._modules["layers"]._modules, x) if lib is not None else None
        if flat is None:
            params, activations = self._flat()
            check_linear_args("MLP", x, params[0], params[1])
        else:
            params, activations = flat
        try:
            # no backward can follow a forward without grad mode: the rule's B is not needed
            feedback, source = self._feedback() if torch.is_grad_enabled() else (None, None)
            return run_node(x, target, trace, params, activations, self._modules["layers"],
                            feedback, source, _native_serves(self))  # direct: no __getattr__
        except RuntimeError as error:  # checked only once a kernel has refused
            refused = error
        check_layers("MLP", params)
        raise refused

    def extra_repr(self) -> str:
        rule = "" if self.rule == "backprop" else f", rule={self.rule}"
        return f"sizes={self.sizes}, activation={self.activation}{rule}"


def run_node(x, target, trace, params, activations, layers, feedback, source, native=True):
    """(logits, loss or None) for the layers as one node: the C++ node or the lean eager
    Function for plain eager calls, MLPFunction under torch.func, torch.compile, autocast or a
    Trace. Shared by MLP and manualbp.chain (a converted nn.Sequential's run of Linears).

    params, activations: as MLP._flat gives them; layers: the Linears they were read from
    (a per_example block's probes are keyed on them); feedback, source: the rule's matrices as
    MLP._feedback gives them, or (None, None); native: the C++ core may serve this call.
    """
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, *params = cast_all(dtype, x, *params)
        feedback = None if feedback is None else cast_all(dtype, *feedback)
    rule_args = () if source is None else (*feedback, source)  # rules.split's layout
    pe = active()
    if pe is not None:  # a per_example block: its probes ride in the trace slot
        probes = pe.node_probes(layers, x)
        lib = (_native_lib() if probes is not None and trace is None and dtype is None
               and x.dtype in _EAGER_DTYPES and native else None)
        if lib is not None:  # the C++ node fills each covered layer's slot (no tracing here)
            slots = [-1 if p is None else p.slot(lib) for p in probes.probes]
            out = lib.mlp(x, target, activations, params, feedback or (), source == DIRECT,
                          slots, pe.clip)
            return (out[0], None) if target is None else out
        if probes is not None:
            probes.trace, trace = trace, probes
    if dtype is None and trace is None and x.dtype in _EAGER_DTYPES and not tracing():
        lib = _native_lib() if native else None
        if lib is not None:  # the C++ twin when built, the rule's matrices handed to it
            out = (lib.mlp(x, target, activations, params) if source is None else
                   lib.mlp(x, target, activations, params, feedback, source == DIRECT))
            return (out[0], None) if target is None else out
        out = _eager_apply(x, target, activations, *params, *rule_args)
        return (out, None) if target is None else out
    if dtype is None:
        out = apply(MLPFunction, x, target, activations, trace, *params, *rule_args)
    else:
        with torch.autocast(x.device.type, enabled=False):
            out = apply(MLPFunction, x, target, activations, trace, *params, *rule_args)
    # the folded loss is float32 under autocast already, like F.cross_entropy there
    return out[0], (out[-1] if target is not None else None)


def _native_probed(lib, x, target, params, activations, accumulate, feedback, source, probes,
                   clip: bool) -> Tensor:
    """MLP.backprop's C++ step inside a per_example block: the C++ pass keeps each probed
    layer's (delta, a_prev), as layer_grads hands them to a probe in Python, and leaves a clipped
    layer's grad_W, grad_b to the block; the shares then go to the probes."""
    loss, shares = lib.backprop_probed(x, target, params, activations, accumulate,
                                       feedback or (), source == DIRECT,
                                       [p is not None for p in probes], clip)
    for i, probe in enumerate(probes):
        if probe is not None and shares[2 * i] is not None:  # a gradient reached the layer
            probe(shares[2 * i], shares[2 * i + 1])
    return loss


def _both_take(W: Tensor, B: Tensor, accumulate: bool) -> bool:
    """Whether _set_grad would make one gradient tensor both W.grad and B.grad (Kolen-Pollack's
    B gets grad_W): a parametrized W's goes on through autograd, and adding into an existing
    .grad only reads it."""
    return W.grad_fn is None and not (accumulate and (W.grad is not None or B.grad is not None))


def _set_grad(p: Tensor, g: Tensor, accumulate: bool) -> None:
    if p.grad is None or not accumulate:
        p.grad = g
    else:
        p.grad.add_(g)
