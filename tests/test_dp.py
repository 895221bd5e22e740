"""DP-SGD end to end: noise, Poisson batches, Opacus's accountant, the harness's dp=sgd."""

import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_mlp import autograd_twin
from test_train import _events
from torch.func import functional_call, grad, vmap

import manualbp as mb
from manualbp.dp import Accountant, PoissonBatches, add_noise
from manualbp.lit import DPSGD, train
from manualbp.lit.grad_noise import noise_scale


def test_add_noise_has_the_dp_sgd_std():
    p = torch.nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    p.grad = torch.full_like(p, 2.0)
    add_noise([p], 1.5, 0.4, "mean", 30.0, torch.Generator().manual_seed(0))
    assert abs(float(p.grad.mean()) - 2.0) < 1e-3
    assert float(p.grad.std()) == pytest.approx(1.5 * 0.4 / 30.0, rel=0.01)
    q = torch.nn.Parameter(torch.zeros(3))  # no .grad yet: noised from zero
    add_noise([q], 1.0, 1.0, "sum")
    assert q.grad is not None and bool((q.grad != 0).all())


def test_add_noise_refuses_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="reduction 'mean' needs batch_size > 0, got None"):
        add_noise(p, 1.0, 1.0, "mean")
    with pytest.raises(ValueError, match=r"expected reduction in \('mean', 'sum'\), got 'avg'"):
        add_noise(p, 1.0, 1.0, "avg")
    with pytest.raises(ValueError, match="noise_multiplier >= 0 and max_norm > 0"):
        add_noise(p, 1.0, 0.0, "sum")


def test_poisson_batches_sample_each_row_with_the_rate():
    sampler = PoissonBatches(1000, 0.05, torch.Generator().manual_seed(1))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    sizes = [len(b) for b in batches]
    assert 30 < sum(sizes) / len(sizes) < 70  # expected 50, std ~7 per batch
    assert all(len(set(b)) == len(b) and max(b, default=0) < 1000 for b in batches)
    with pytest.raises(ValueError, match="expected 0 < sample_rate <= 1, got 0"):
        PoissonBatches(10, 0)


def test_accountant_is_opacus_rdp():
    from opacus.accountants import RDPAccountant

    ours, ref = Accountant("rdp"), RDPAccountant()
    assert ours.epsilon(1e-5) == 0.0
    for _ in range(40):
        ours.step(1.1, 0.02)
        ref.step(noise_multiplier=1.1, sample_rate=0.02)
    assert ours.epsilon(1e-5) == ref.get_epsilon(delta=1e-5)
    with pytest.raises(ValueError, match="expected mechanism 'rdp', 'prv' or 'gdp', got 'x'"):
        Accountant("x")


def test_accountant_without_opacus_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(ImportError, match=r"pip install 'manualbp\[dp\]'"):
        Accountant()


def test_dp_step_is_the_clipped_sum_over_the_expected_batch():
    # the callback's step with sigma = 0 against vmap(grad): (sum_n c_n g_n) / (q N)
    torch.manual_seed(2)
    net = mb.MLP([5, 6, 3], activation="tanh", dtype=torch.float64)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    twin = autograd_twin(net)
    params = {k: v.detach() for k, v in twin.named_parameters()}
    g = vmap(grad(lambda ps, x_n, y_n: F.cross_entropy(
        functional_call(twin, ps, (x_n[None],)), y_n[None])), in_dims=(None, 0, 0))(params, x, y)
    g = dict(zip([n for n, _ in net.named_parameters()], g.values(), strict=True))
    norms = torch.stack([v.flatten(1).square().sum(1) for v in g.values()]).sum(0).sqrt()
    c = (0.5 / (norms + 1e-6)).clamp(max=1)
    dp = DPSGD(max_norm=0.5, noise_multiplier=0.0)
    dp.sample_rate, dp.expected_batch = 0.1, 9.0
    logged = {}
    module = SimpleNamespace(net=net, parameters=net.parameters,
                             log=lambda name, value, **kw: logged.update({name: value}))
    dp.on_train_batch_start(None, module, (x, y), 0)
    net.loss(x, y)[0].backward()
    dp.on_after_backward(None, module)
    for name, p in net.named_parameters():
        want = (c.reshape(-1, *[1] * (g[name].dim() - 1)) * g[name]).sum(0) / 9.0
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dp.norms, norms, rtol=1e-10, atol=1e-12)
    assert logged["dp/epsilon"] == math.inf or logged["dp/epsilon"] > 0  # sigma 0: no privacy


def test_noise_scale_from_norms_is_tr_sigma_over_g_squared():
    torch.manual_seed(3)
    g = torch.randn(16, 4, dtype=torch.float64) + 0.7  # per-example gradients
    G = g.mean(0)
    S = g.var(0, correction=1).sum()  # tr(Sigma), unbiased
    want = S / (G.square().sum() - S / 16)
    assert noise_scale(g.norm(dim=1), [G]) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.slow
def test_dp_sgd_run_logs_epsilon_and_the_panels(compose_train, tmp_path):
    cfg = compose_train("dp=sgd", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
                        "model.optimizer.lr=0.01", "callbacks.grad_noise.every_n_steps=5",
                        "callbacks.decision_boundary=null", "callbacks.hidden_embedding=null")
    result = train(cfg)
    steps = int(1257 / 64)  # int(1 / q) Poisson batches an epoch
    assert result.global_step <= steps
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=1.0, sample_rate=64 / 1257)
    events = _events(tmp_path)
    eps = [e.value for e in events.Scalars("dp/epsilon")]
    assert eps[-1] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-6)
    assert "per_example/grad_norm" in events.Tags()["histograms"]
    assert "check/grad_rel_err" not in events.Tags()["scalars"]  # dp=sgd turns it off
    assert result.metrics["test/acc"] > 0.5


def test_the_plain_run_logs_the_noise_scale(compose_train, tmp_path):
    cfg = compose_train("data=xor", "trainer.max_epochs=1", "callbacks.grad_noise.every_n_steps=1",
                        "callbacks.decision_boundary=null", "callbacks.hidden_embedding=null")
    train(cfg)
    tags = _events(tmp_path).Tags()
    assert "per_example/grad_norm" in tags["histograms"]
    assert "per_example/noise_scale" in tags["scalars"]


@pytest.mark.parametrize("override, match", [
    ("model.backend=autograd", "expected model.backend=manual, got 'autograd'"),
    ("data.standardize=true", "data.standardize=true fits the mean and std on the training rows"),
    ("trainer.accumulate_grad_batches=2", "expected trainer.accumulate_grad_batches=1, got 2"),
])
def test_dp_refuses_what_it_cannot_do_honestly(compose_train, override, match):
    with pytest.raises(ValueError, match=match):
        train(compose_train("dp=sgd", "trainer.max_epochs=1", override))
