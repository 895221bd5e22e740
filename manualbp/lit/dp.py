"""DP-SGD in the harness: `python train.py dp=sgd` trains any data set privately.

Each training batch is Poisson-sampled (every training row joins with probability
q = data.batch_size / training rows, unless dp.sample_rate says otherwise); the step's forward
and backward run inside mb.per_example(net, max_norm=C), which leaves the clipped gradient;
then .grad = (clipped sum + N(0, (sigma C)^2 I)) / (q N), as Opacus forms it, and Opacus's
accountant takes the step. dp/epsilon (at dp.delta) is logged every step.

Refused (before training) where the result would not be honest DP: the autograd backend (its
nn.Linear layers are not manualbp's, so nothing clips them), a data set standardised with its
training rows' mean and std (those statistics are not private), more than one device or
process, gradient accumulation, and a data module without Poisson sampling.
"""

import lightning as L

import manualbp as mb
from manualbp.dp import Accountant, add_noise


class DPSGD(L.Callback):
    """Clip, noise and account every training step (see the module docstring).

    Args:
        max_norm: C, the per-example clipping norm. Default: 1.0.
        noise_multiplier: sigma; the noise std is sigma C. Default: 1.0.
        delta: the delta of the (epsilon, delta) reported. Default: 1e-5.
        sample_rate: q; None derives it from data.batch_size / training rows. Default: None.
        accountant: Opacus's accountant, "rdp", "prv" or "gdp". Default: "rdp".
        seed: seed of the noise generator; None draws from torch's global RNG. Default: None.

    Attributes:
        epsilon: privacy spent so far (at delta).
        norms: (B,) the last step's per-example gradient norms, before clipping.
    """

    def __init__(self, max_norm: float = 1.0, noise_multiplier: float = 1.0,
                 delta: float = 1e-5, sample_rate: float | None = None,
                 accountant: str = "rdp", seed: int | None = None) -> None:
        if not max_norm > 0 or not noise_multiplier >= 0 or not 0 < delta < 1:
            raise ValueError(
                f"dp: expected max_norm > 0, noise_multiplier >= 0 and 0 < delta < 1, got "
                f"{max_norm}, {noise_multiplier}, {delta}")
        self.max_norm, self.noise_multiplier, self.delta = max_norm, noise_multiplier, delta
        self.sample_rate = sample_rate
        self.accountant = Accountant(accountant)
        self.seed = seed
        self.generator = None
        self.epsilon = 0.0
        self.norms = None
        self._block = None
        self._rows = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        _refuse_dishonest(trainer, pl_module, dm)
        n = len(dm.full_train_tensors()[0])
        q = self.sample_rate if self.sample_rate is not None else dm.batch_size / n
        if not 0 < q <= 1:
            raise ValueError(f"dp.sample_rate: expected 0 < q <= 1, got {q}")
        self.sample_rate, self.expected_batch = q, q * n
        dm.poisson_rate = q  # the training loader now samples each row with probability q
        if self.seed is not None:
            import torch

            self.generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._rows = batch[0].shape[0]
        if self._rows:
            self._block = mb.per_example(pl_module.net, reduction="mean", max_norm=self.max_norm)
            self._block.__enter__()

    def on_after_backward(self, trainer, pl_module) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(None, None, None)
            self.norms = block.norms
        params = [p for p in pl_module.parameters() if p.requires_grad]
        scale = self._rows / self.expected_batch  # clipped mean over B rows -> sum / (q N)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        add_noise(params, self.noise_multiplier, self.max_norm, "mean", self.expected_batch,
                  self.generator)
        self._account(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._rows == 0:  # an empty Poisson batch: no update, but the step is counted
            self._account(pl_module)

    def _account(self, pl_module) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.epsilon = self.accountant.epsilon(self.delta)
        pl_module.log("dp/epsilon", self.epsilon, on_step=True, on_epoch=False, prog_bar=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(type(exception), exception, None)

    def state_dict(self) -> dict:
        return {"history": list(self.accountant._accountant.history), "epsilon": self.epsilon}

    def load_state_dict(self, state: dict) -> None:
        self.accountant._accountant.history = list(state["history"])
        self.epsilon = state["epsilon"]


def _refuse_dishonest(trainer, pl_module, dm) -> None:
    if getattr(pl_module, "backend", "manual") != "manual":
        raise ValueError(
            f"dp: expected model.backend=manual, got {pl_module.backend!r}; the autograd "
            "backend's nn.Linear layers are not manualbp's, so nothing would clip them")
    if trainer.world_size > 1:
        raise ValueError(f"dp: expected one device and process, got world size "
                         f"{trainer.world_size}; run DP-SGD on one device (trainer=cpu)")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(f"dp: expected trainer.accumulate_grad_batches=1, got "
                         f"{trainer.accumulate_grad_batches}; each DP-SGD step is one batch")
    if not hasattr(dm, "full_train_tensors") or not hasattr(dm, "poisson_rate"):
        raise ValueError(f"dp: expected a manualbp data module with Poisson sampling, got "
                         f"{type(dm).__name__}")
    if getattr(dm, "standardize", False):
        raise ValueError(
            f"dp: data.standardize=true fits the mean and std on the training rows, which is "
            f"not private; set data.standardize=false for {dm.name}")
