"""The live gradient check: autograd's reference equals the hand-written gradients."""

from functools import partial

import lightning as L
import pytest
import torch

import manualbp as mb
from manualbp.data import XORDataModule
from manualbp.lit import GradCheck, LitMLP
from manualbp.lit.grad_check import max_relative_error, reference_grads


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "gelu"])
@pytest.mark.parametrize(("task", "classes"), [("multiclass", 3), ("binary", 2)])
def test_reference_grads_match_the_manual_backward(activation, task, classes):
    torch.manual_seed(0)
    model = LitMLP(partial(mb.MLP), partial(torch.optim.SGD, lr=0.1), 4, classes, task,
                   hidden_sizes=[5, 6], activation=activation).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, classes, (10,))
    loss, _, _ = model.model_step((x, y))
    loss.backward()
    layers = model.linear_layers()
    refs = reference_grads(layers, model.activations, model.head, x, y)
    grads = [p.grad for layer in layers for p in (layer.weight, layer.bias)]
    assert len(refs) == len(grads) == 6
    assert max_relative_error(grads, refs) < 1e-12


def test_max_relative_error_sees_a_wrong_sign():
    ref = [torch.tensor([1.0, -2.0]), torch.tensor([3.0])]
    assert max_relative_error([r.clone() for r in ref], ref) == 0.0
    assert max_relative_error([ref[0], -ref[1]], ref) == pytest.approx(2.0)


class _Corrupt(L.Callback):
    """Flips the sign of one gradient, as a broken backward would."""

    def on_after_backward(self, trainer, pl_module):
        pl_module.linear_layers()[0].weight.grad.neg_()


class _ListLogger(L.pytorch.loggers.Logger):
    name, version = "list", 0

    def __init__(self):
        super().__init__()
        self.values = []

    def log_metrics(self, metrics, step=None):
        if "check/grad_rel_err" in metrics:
            self.values.append(metrics["check/grad_rel_err"])

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize(("corrupt", "low", "high"), [(False, 0.0, 1e-5), (True, 1.0, 3.0)])
def test_grad_check_callback_logs_small_errors_and_catches_a_broken_backward(corrupt, low, high):
    torch.manual_seed(0)
    dm = XORDataModule(n_samples=200, batch_size=32)
    model = LitMLP(partial(mb.MLP), partial(torch.optim.SGD, lr=0.1), 2, 2, "binary",
                   hidden_sizes=[8], activation="tanh")
    logger = _ListLogger()
    callbacks = ([_Corrupt()] if corrupt else []) + [GradCheck(every_n_steps=2)]
    trainer = L.Trainer(max_steps=6, logger=logger, callbacks=callbacks, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert len(logger.values) == 3  # steps 0, 2, 4
    assert all(low <= v <= high for v in logger.values), logger.values
