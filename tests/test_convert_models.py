"""convert inside real models: outputs, every parameter grad and the input grad unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_convert import D, assert_twin_matches
from torch import nn
from torch.testing import assert_close

from manualbp.convert import convert
from manualbp.modules import Linear


def encoder(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first,
        dtype=D,
    )
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder(norm_first, activation, train):
    model = encoder(norm_first, activation).train(train)
    twin, report = assert_twin_matches(model, torch.randn(3, 5, 8, dtype=D))
    names = [f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    assert report.converted == names and report.fused == []
    assert all(type(twin.get_submodule(n)) is Linear for n in names)
    out_proj = [name for name, why in report.skipped if "MultiheadAttention" in why]
    assert out_proj == ["layers.0.self_attn.out_proj", "layers.1.self_attn.out_proj"]
    assert type(twin.layers[0].self_attn.out_proj) is not Linear


def test_transformer_fast_path_unchanged(monkeypatch):
    """Eval + no grad: both take torch's fast path (weights read directly), same outputs."""
    fast = torch._transformer_encoder_layer_fwd
    calls = []
    monkeypatch.setattr(
        torch, "_transformer_encoder_layer_fwd", lambda *args: calls.append(1) or fast(*args)
    )
    model = encoder(False, "relu").eval()
    twin = convert(copy.deepcopy(model))
    x = torch.randn(3, 5, 8, dtype=D)
    with torch.no_grad():
        expected, n_fast = model(x), len(calls)
        assert_close(twin(x), expected)
    assert n_fast == 2 and len(calls) == 4


class Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.proj = nn.ModuleDict({k: nn.Linear(d, d, bias=k != "o", dtype=D) for k in "qkvo"})

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        q, k, v = (self.proj[n](x).view(B, T, self.n_heads, -1).transpose(1, 2) for n in "qkv")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, d / h)
        return self.proj["o"](y.transpose(1, 2).reshape(B, T, d))


class GatedMLP(nn.Module):  # activations called as functions and as an attribute module
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, dtype=D), nn.Linear(d, 2 * d, dtype=D)
        self.down_proj, self.act_fn = nn.Linear(2 * d, d, dtype=D), nn.GELU()

    def forward(self, x):
        return self.down_proj(self.act_fn(F.silu(self.gate_proj(x)) * F.gelu(self.up_proj(x))))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, dtype=D), nn.LayerNorm(d, dtype=D)
        self.attn, self.mlp = Attention(d, 2), GatedMLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, dtype=D)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype=D)
        self.lm_head.weight = self.embed.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.1)

    def forward(self, ids):  # (B, T) -> (B, T, vocab)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def test_hf_style_block_and_tied_lm():
    torch.manual_seed(0)
    assert_twin_matches(Block(8), torch.randn(2, 5, 8, dtype=D))
    model = TinyLM()
    twin, report = assert_twin_matches(model, torch.randint(0, 11, (2, 5)))
    assert len(report.converted) == 15 and report.fused == [] and report.skipped == []
    assert "blocks.1.attn.proj.q" in report.converted and "lm_head" in report.converted
    assert twin.lm_head.weight is twin.embed.weight  # the tie survives
    assert type(twin.blocks[0].mlp.act_fn) is nn.GELU  # not in a Sequential: not fused
    seen = []
    twin.apply(lambda m: seen.append(m) if isinstance(m, nn.Linear) else None)
    assert len(seen) == 15 and all(type(m) is Linear for m in seen)  # _init_weights still sees them


class Mlp(nn.Module):  # timm's ViT Mlp layout: attributes, not a Sequential
    def __init__(self, d=6):
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def test_timm_mlp_converts_without_fusing():
    torch.manual_seed(0)
    twin, report = assert_twin_matches(Mlp().double(), torch.randn(4, 3, 6, dtype=D))
    assert report.converted == ["fc1", "fc2"] and report.fused == []
    assert twin.fc1.activation == twin.fc2.activation == "identity"
    assert type(twin.act) is nn.GELU


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.ModuleList([
            nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Dropout(0.2)),
            nn.Sequential(nn.Linear(6, 6), nn.ELU(), nn.Linear(6, 6)),
        ])
        self.heads = nn.ModuleDict({
            "a": nn.Sequential(nn.Linear(6, 3), nn.Softplus()), "b": nn.Linear(6, 2),
        })
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x):  # (N, 4) -> (N, 5)
        x = self.frozen(x)
        for stage in self.trunk:
            x = stage(x)
        return torch.cat([self.heads["a"](x), self.heads["b"](x)], dim=-1)


def test_nested_model_keeps_params_dtype_device_grad_flags_and_modes():
    torch.manual_seed(0)
    model = Nested().double().train()
    model.trunk[1].eval()
    twin, report = assert_twin_matches(model, torch.randn(5, 4, dtype=D))
    assert report.fused == [("trunk.0.0", "trunk.0.1"), ("trunk.1.0", "trunk.1.1"),
                            ("heads.a.0", "heads.a.1")]
    assert {n: m.training for n, m in twin.named_modules()} == {
        n: m.training for n, m in model.named_modules()
    }
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (q.dtype, q.device, q.requires_grad) == (p.dtype, p.device, p.requires_grad), name
    assert twin.frozen.weight.grad is None and type(twin.frozen) is Linear
    f32 = convert(Nested())
    assert all(p.dtype == torch.float32 for p in f32.parameters())
