"""DP-SGD around mb.per_example: Gaussian noise on the clipped sum, Poisson sampling, and
Opacus's privacy accountant (the optional extra `manualbp[dp]`; imported only when asked for).

One DP-SGD step (Abadi et al. 2016), with q the sampling rate and N the training rows:

    batch      every row joins independently with probability q        (Poisson sampling)
    clip       sum_n min(1, C / ||g_n||) g_n                          (mb.per_example, max_norm=C)
    noise      + N(0, (sigma C)^2 I), then / (q N), as Opacus divides  (add_noise)
    account    one step of the sampled Gaussian mechanism (sigma, q)   (Accountant.step)
"""

import torch

from manualbp.per_example import REDUCTIONS


def add_noise(params, noise_multiplier: float, max_norm: float, reduction: str = "sum",
              batch_size: float | None = None, generator: torch.Generator | None = None) -> None:
    """Add DP-SGD's noise N(0, (sigma C)^2) to each p.grad (the block's clipped gradient).

    reduction "sum": p.grad holds the clipped sum and gets the noise as it is; "mean": the noise
    is divided by batch_size, which under Poisson sampling is the expected batch size q N (so
    p.grad should hold the clipped sum / q N, as Opacus forms it). Parameters without .grad
    get a zero one first: each step must noise every parameter.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"add_noise: expected reduction in {REDUCTIONS}, got {reduction!r}")
    if reduction == "mean" and not (batch_size and batch_size > 0):
        raise ValueError(f"add_noise: reduction 'mean' needs batch_size > 0, got {batch_size!r}")
    if noise_multiplier < 0 or max_norm <= 0:
        raise ValueError(f"add_noise: expected noise_multiplier >= 0 and max_norm > 0, got "
                         f"{noise_multiplier!r} and {max_norm!r}")
    std = noise_multiplier * max_norm / (batch_size if reduction == "mean" else 1.0)
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        p.grad.add_(noise, alpha=std)


class PoissonBatches(torch.utils.data.Sampler):
    """Batch sampler for DataLoader(batch_sampler=...): every row joins each batch independently
    with probability sample_rate; int(1 / sample_rate) batches an epoch, as Opacus samples.

    Batches vary in size and may be empty; that randomness is what the accountant assumes.
    """

    def __init__(self, num_rows: int, sample_rate: float, generator=None) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"PoissonBatches: expected 0 < sample_rate <= 1, got {sample_rate}")
        self.num_rows, self.sample_rate, self.generator = num_rows, sample_rate, generator
        self.steps = max(1, int(1 / sample_rate))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(self.num_rows, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


class Accountant:
    """Opacus's accountant for the sampled Gaussian mechanism: step() per noisy step,
    epsilon(delta) for the privacy spent so far.

    Args:
        mechanism: "rdp" (default), "prv" or "gdp", Opacus's accountants.
    """

    def __init__(self, mechanism: str = "rdp") -> None:
        try:
            from opacus.accountants import create_accountant
        except ImportError:
            raise ImportError(
                "manualbp.dp.Accountant: needs Opacus's accountant; pip install 'manualbp[dp]'"
            ) from None
        try:
            self._accountant = create_accountant(mechanism)
        except ValueError:
            raise ValueError(
                f"Accountant: expected mechanism 'rdp', 'prv' or 'gdp', got {mechanism!r}"
            ) from None
        self.mechanism = mechanism

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Privacy spent so far, at this delta (0 before the first step)."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=delta))

