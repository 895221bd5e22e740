"""The torch variants the benchmark races, built from one set of initial weights.

autograd   nn.Sequential(nn.Linear, act, ..., nn.Linear) + F.cross_entropy
compile    the same network and loss under torch.compile (forward + loss; backward via AOTAutograd)
per_layer  manualbp.convert(the autograd model): manualbp.Linear with the activation fused; the
           training code is unchanged, so the loss stays F.cross_entropy
natural    manualbp.MLP + manualbp.softmax_cross_entropy(mlp(x), y): the path users write first
mlp        manualbp.MLP.loss: one hand-written autograd node for the whole stack with the softmax
           cross-entropy folded in (delta_L = yhat - y by hand too)
backprop   manualbp.MLP.backprop: the same pass with no autograd at all; it fills .grad itself

Each manualbp variant runs on the C++ core when it is built; <name>_py is the same code with the
core paused (the Python Functions: the fallback), and <name>_general the fallback as it would be
without the lean eager twins (LinearActEagerFunction, MLPEagerFunction): the general Functions
through their automatic old-style twin. <name>_bare calls the native nodes directly, with none
of manualbp's Python around them (no checks, no dispatch, parameters read once when built): the
distance from the path to its bare twin is that Python; from the bare twin to the floor, the
autograd engine, Tensor.backward's wrapper and nn.Module calls, which autograd pays too.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import manualbp as mb
from manualbp import native
from manualbp.apply import apply

NAMES = ("autograd", "compile", "per_layer", "natural", "mlp", "backprop")
FALLBACK = ("per_layer_py", "natural_py", "mlp_py", "backprop_py", "per_layer_general",
            "mlp_general")
BARE = ("per_layer_bare", "natural_bare", "mlp_bare", "backprop_bare")
ACT_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


@dataclass
class Variant:
    """A model, the function from a batch to its loss, and how the per-layer model was made."""

    name: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]  # (x (m, n_0), y (m,)) -> scalar loss
    autocast: torch.dtype | None
    source: str = ""
    fills: bool = False  # loss_fn writes .grad itself, with no graph (backprop_bare)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        if self.autocast is None:
            return self.loss_fn(x, y)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.loss_fn(x, y)

    def fill_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward, loss and backward: every parameter's .grad gets this batch's gradient."""
        if not self.name.endswith(("_py", "_general")):
            return self._fill_grads(x, y)
        with native.paused():  # the Python Functions: what runs where the core is not built
            return self._fill_grads(x, y)

    def _fill_grads(self, x: Tensor, y: Tensor) -> Tensor:
        if self.fills:
            return self.loss_fn(x, y)
        if not self.name.startswith("backprop"):
            loss = self.loss(x, y)
            loss.backward()
            return loss
        if self.autocast is None:
            return self.model.backprop(x, y)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.model.backprop(x, y)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One training step without the update: zero grads, forward, loss, backward."""
        self.model.zero_grad(set_to_none=True)
        return self.fill_grads(x, y)


def autograd_net(sizes: list[int], activation: str) -> nn.Sequential:
    """The plain-torch twin: Linear, activation module, ..., Linear (logits)."""
    if activation not in ACT_MODULES:
        raise ValueError(
            f"benchmark: unknown activation {activation!r}; expected one of {sorted(ACT_MODULES)}"
        )
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACT_MODULES[activation]())
    return nn.Sequential(*layers)


def per_layer_net(reference: nn.Sequential, activation: str) -> tuple[nn.Module, str]:
    """manualbp.convert(reference) when the package has it, else the same thing built by hand."""
    convert = getattr(mb, "convert", None)
    if convert is not None:
        net = convert(copy.deepcopy(reference))
        plain = [m for m in net.modules() if type(m) is nn.Linear]
        if plain:
            raise RuntimeError(f"benchmark: manualbp.convert left {len(plain)} nn.Linear in place")
        return net, "manualbp.convert"
    linears = [m for m in reference if isinstance(m, nn.Linear)]
    acts = [activation] * (len(linears) - 1) + ["identity"]
    net = nn.Sequential(*(
        mb.Linear(lin.in_features, lin.out_features, activation=act)
        for lin, act in zip(linears, acts, strict=True)
    ))
    copy_params(reference, net)
    return net, "nn.Sequential of manualbp.Linear"


def copy_params(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters in registration order (W1, b1, W2, b2, ... in every variant)."""
    with torch.no_grad():
        for p_dst, p_src in zip(dst.parameters(), src.parameters(), strict=True):
            if p_dst.shape != p_src.shape:
                raise RuntimeError(f"benchmark: shape {p_dst.shape} != {p_src.shape}")
            p_dst.copy_(p_src)


def build(sizes: list[int], activation: str, device: torch.device, autocast: torch.dtype | None,
          names: tuple[str, ...] = NAMES, seed: int = 0) -> dict[str, Variant]:
    """Every requested variant on device, float32 parameters, all with the same weights."""
    torch.manual_seed(seed)
    reference = autograd_net(sizes, activation).to(device)
    variants: dict[str, Variant] = {}
    for name in names:
        if name == "autograd":
            net = reference
            variants[name] = Variant(name, net, _ce(net, F.cross_entropy), autocast)
        elif name == "compile":
            net = copy.deepcopy(reference)
            variants[name] = Variant(name, net, torch.compile(_ce(net, F.cross_entropy)), autocast)
        elif name == "per_layer":
            net, source = per_layer_net(reference, activation)
            net = net.to(device)
            variants[name] = Variant(name, net, _ce(net, F.cross_entropy), autocast, source)
        elif name in ("per_layer_py", "per_layer_general"):
            net, source = per_layer_net(reference, activation)
            net = net.to(device)
            fn = _ce(net, F.cross_entropy) if name == "per_layer_py" else _general_layers(net)
            variants[name] = Variant(name, net, fn, autocast, source)
        elif name in ("natural", "natural_py"):
            net = mb.MLP(sizes, activation).to(device)
            copy_params(reference, net)
            variants[name] = Variant(name, net, _ce(net, mb.softmax_cross_entropy), autocast)
        elif name in ("mlp", "backprop", "mlp_py", "backprop_py"):
            net = mb.MLP(sizes, activation).to(device)
            copy_params(reference, net)
            variants[name] = Variant(name, net, lambda x, y, net=net: net.loss(x, y)[0], autocast)
        elif name == "mlp_general":
            net = mb.MLP(sizes, activation).to(device)
            copy_params(reference, net)
            variants[name] = Variant(name, net, _general_mlp(net), autocast)
        elif name in BARE:
            variants[name] = _bare(name, reference, sizes, activation, device, autocast)
        else:
            raise ValueError(
                f"benchmark: unknown variant {name!r}; expected one of {NAMES + FALLBACK + BARE}")
    return variants


def _bare(name: str, reference: nn.Sequential, sizes: list[int], activation: str,
          device: torch.device, autocast: torch.dtype | None) -> Variant:
    """The path's native nodes called straight from here: what the path costs without
    manualbp's Python (checks, dispatch, the parameter walk) around them."""
    lib = native.lib()
    if lib is None:
        raise RuntimeError(f"benchmark: {name} needs the C++ core (native.lib() is None)")
    if name == "per_layer_bare":
        net, source = per_layer_net(reference, activation)
        net = net.to(device)
        layers = [m for m in net if not isinstance(m, nn.Identity)]  # convert's placeholders
        if not all(isinstance(m, mb.Linear) for m in layers):
            raise RuntimeError("benchmark: per_layer_bare expects convert to give mb.Linear")
        steps = [(m.weight, m.bias, m.activation) for m in layers]

        def per_layer(x: Tensor, y: Tensor) -> Tensor:
            for W, b, act in steps:
                x = lib.linear_act(x, W, b, act)
            return F.cross_entropy(x, y)

        return Variant(name, net, per_layer, autocast, source)
    net = mb.MLP(sizes, activation).to(device)
    copy_params(reference, net)
    params, acts = net._flat()
    if name == "natural_bare":
        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            logits = lib.mlp(x, None, acts, params)[0]
            return lib.softmax_cross_entropy(logits, y, None, -100, "mean", 0.0)[0]
    elif name == "mlp_bare":
        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return lib.mlp(x, y, acts, params)[1]
    else:  # backprop_bare
        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return lib.backprop(x, y, params, acts, True)
    return Variant(name, net, loss_fn, autocast, fills=name == "backprop_bare")


def _ce(net: nn.Module, loss: Callable) -> Callable[[Tensor, Tensor], Tensor]:
    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        return loss(net(x), y)

    return loss_fn


def _general_mlp(net: mb.MLP) -> Callable[[Tensor, Tensor], Tensor]:
    """mlp.loss as it would run without MLPEagerFunction: MLPFunction through apply()."""
    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        params, acts = net._flat()
        return apply(mb.MLPFunction, x, y, acts, None, *params)[-1]

    return loss_fn


def _general_layers(net: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The converted model as it would run without LinearActEagerFunction: each manualbp.Linear
    through LinearActFunction and apply() (other modules, nn.Identity here, as they are)."""
    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        for m in net:
            if isinstance(m, mb.Linear):
                out = apply(mb.LinearActFunction, x, m.weight, m.bias, m.activation)
                x = out[0] if isinstance(out, tuple) else out
            else:
                x = m(x)
        return F.cross_entropy(x, y)

    return loss_fn
