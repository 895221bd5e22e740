"""Real-model checks of convert and unconvert: a GPT-2-style decoder built on a Conv1D written
here in transformers' layout (no transformers import), a ViT block, torch's TransformerEncoder.

Each: outputs and every gradient equal the unconverted model's in float64 (random signed
non-contiguous upstream gradient), then 20 AdamW steps side by side stay together.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_convert import assert_twin_matches
from torch import nn
from torch.testing import assert_close

import manualbp as mb
from manualbp.modules import Linear

D = torch.float64


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D's layout: weight (nx, nf), forward x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.2)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = self.attn_dropout(att.softmax(-1)) @ v  # (B, h, T, d / h)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, d)))


class GPT2MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = GPT2Attention(d, 2), GPT2MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT2(nn.Module):
    def __init__(self, vocab=13, d=8, n_layer=2, T=6):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.h = nn.ModuleList(GPT2Block(d) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2

    def forward(self, ids):  # (B, T) -> (B, T, vocab)
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class ViTBlock(nn.Module):  # timm's Block: attention with a fused qkv Linear, Mlp with GELU
    def __init__(self, d=8, n_head=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.n_head = nn.Linear(d, 3 * d), nn.Linear(d, d), n_head
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        B, N, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


def _encoder():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation="gelu",
                                       batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _models():
    torch.manual_seed(0)
    return {
        "gpt2": (TinyGPT2().double(), lambda: torch.randint(0, 13, (3, 6))),
        "vit": (ViTBlock().double(), lambda: torch.randn(3, 5, 8, dtype=D)),
        "encoder": (_encoder().double(), lambda: torch.randn(3, 5, 8, dtype=D)),
    }


def _train_side_by_side(model, twin, make_x, steps=20):
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01) for m in (model, twin)]
    shape = model(make_x()).shape
    for step in range(steps):
        torch.manual_seed(100 + step)
        x = make_x()
        g = torch.randn(2, *shape, dtype=D)[0]  # a signed, non-contiguous gradient per step
        for m, opt in zip((model, twin), opts, strict=True):
            opt.zero_grad()
            torch.manual_seed(step)  # the same dropout masks in both
            out = m(x)
            out.backward(g)
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_close(q, p, msg=name)


@pytest.fixture
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a shared 2-core machine the
    threads' spin-waits made these steps up to 80x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "vit", "encoder"])
def test_real_models_match_and_train_alongside(kind, one_thread):
    model, make_x = _models()[kind]
    model.train()
    twin, report = assert_twin_matches(model, make_x())
    if kind == "gpt2":
        conv1d = [f"h.{i}.{m}" for i in range(2)
                  for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        assert report.converted == conv1d + ["lm_head"]
        assert all(isinstance(twin.get_submodule(n), Conv1D) for n in conv1d)  # still Conv1D
        assert twin.lm_head.weight is twin.wte.weight
    if kind == "vit":
        assert report.fused == [("mlp.0", "mlp.1")]
    _train_side_by_side(model, twin, make_x)


def test_converted_conv1d_pickles_and_deep_copies(tmp_path):
    torch.manual_seed(0)
    model = mb.convert(TinyGPT2().double().eval())
    ids = torch.randint(0, 13, (2, 6))
    torch.save(model, tmp_path / "m.pt")
    for twin in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(model)):
        assert_close(twin(ids), model(ids))
        conv = twin.h[0].attn.c_attn
        assert isinstance(conv, Conv1D) and type(conv) is type(model.h[0].attn.c_attn)
        assert twin.lm_head.weight is twin.wte.weight


def test_conv1d_state_dict_and_report_of_misfits():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(4, 3), nn.ReLU())
    keys = list(model.state_dict())
    weight = model[0].weight
    _, report = mb.convert(model, report=True)
    assert report.converted == ["0"] and list(model.state_dict()) == keys
    assert model[0].weight is weight and weight.shape == (3, 4)  # (in, out) kept

    class Misfit(nn.Module):  # named Conv1D, but the weight is (out, in) with no nf
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.weight.t()
    Misfit.__name__ = "Conv1D"

    class DenseGeneral(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.kernel
    _, report = mb.convert(nn.ModuleDict({"a": Misfit(), "b": DenseGeneral(),
                                          "q": torch.ao.nn.quantized.dynamic.Linear(3, 4)}),
                           report=True)
    why = dict(report.skipped)
    assert report.converted == []
    assert "does not have transformers' Conv1D layout" in why["a"] and "nf=None" in why["a"]
    assert "is not an nn.Linear nor a Conv1D" in why["b"]
    assert "quantized layer" in why["q"]


def test_fused_linear_contract():
    """A fused Linear is the pair Linear + g as one module, wherever it is called from: directly,
    through a slice, and as its hooks see it. fuse=False keeps every Linear returning z."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)).double()
    model = mb.convert(copy.deepcopy(ref))
    x = torch.randn(2, 4, dtype=D)
    a = F.gelu(ref[0](x))
    assert "activation=gelu" in repr(model[0])
    assert_close(model[0](x), a)
    assert_close(model[:1](x), a)
    assert_close(model[:2](x), ref[:2](x))
    seen = []
    model[0].register_forward_hook(lambda m, inputs, out: seen.append(out))
    model[0].register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(grad_out[0]))
    out = model(x)
    g = torch.randn_like(out)
    out.backward(g)
    assert_close(seen[0], a)  # the hook sees g(z) ...
    assert_close(seen[1], g @ ref[2].weight)  # ... and dL/dg(z)
    plain = mb.convert(copy.deepcopy(ref), fuse=False)
    assert_close(plain[0](x), ref[0](x))  # z
    assert type(plain[1]) is nn.GELU


def test_unconvert_round_trip_same_objects_and_outputs():
    torch.manual_seed(0)
    model, make_x = _models()["gpt2"]
    vit = _models()["vit"][0].eval()
    for m, x in ((model.eval(), make_x()), (vit, torch.randn(2, 5, 8, dtype=D))):
        expected = m(x)
        params = list(m.parameters())
        modules_before = {n: type(s) for n, s in m.named_modules()}
        keys = list(m.state_dict())
        mb.convert(m)
        _, report = mb.unconvert(m, report=True)
        assert {n: type(s) for n, s in m.named_modules()} == modules_before
        assert all(p is q for p, q in zip(m.parameters(), params, strict=True))
        assert list(m.state_dict()) == keys
        assert_close(m(x), expected)
        assert not any(isinstance(s, Linear) for s in m.modules())
    assert report.fused == [("mlp.0", "mlp.1")] and type(vit.mlp[1]) is nn.GELU
    assert str(report).startswith("unconvert: 4 made plain again, 1 activations put back")


def _is_quantized(m):
    return type(m) is torch.ao.nn.quantized.dynamic.Linear


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unconverted_models_quantize_and_script():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    expected = model(x)
    mb.convert(model)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    assert not any(_is_quantized(m) for m in quantized.modules())  # manualbp.Linear: skipped
    mb.unconvert(model)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    assert sum(_is_quantized(m) for m in quantized.modules()) == 2
    assert_close(quantized(x), expected, atol=0.05, rtol=0.05)
    assert_close(torch.jit.script(model)(x), expected)


def test_unconvert_leaves_layers_with_no_plain_form_and_says_why():
    model = nn.Sequential(mb.Linear(3, 4, activation="tanh"), mb.MLP([4, 2]))
    _, report = mb.unconvert(model, report=True)
    why = dict(report.skipped)
    assert "activation='tanh'" in why["0"] and "one node by design" in why["1"]
    assert type(model[0]) is Linear and model[1].layers[0].activation == "identity"
    assert report.converted == []
    with pytest.raises(TypeError, match="unconvert: expected an nn.Module, got int"):
        mb.unconvert(3)
