"""A loss that turns NaN or infinite stops the run with advice; no NaN weights reach disk."""

import lightning as L
import pytest
import torch

from manualbp.lit import NonFiniteLossError, train, user_message

FAST = ["data=xor", "callbacks=minimal", "logger=csv", "trainer.max_epochs=5",
        "trainer.num_sanity_val_steps=0"]
# Plain SGD whose learning rate grows 1000-fold every epoch: fine at first, then it diverges.
EXPLODING = ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.1",
             "model.scheduler={_target_:torch.optim.lr_scheduler.ExponentialLR,"
             "_partial_:true,gamma:1000}"]


def _finite_weights(path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def test_diverging_loss_stops_with_step_and_advice_and_saves_the_last_good_weights(
        compose_train, tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        train(compose_train(*FAST, *EXPLODING))
    message = str(info.value)
    assert "train/loss is nan at step" in message or "train/loss is inf at step" in message
    assert "try a lower learning rate, e.g. model.optimizer.lr=" in message
    step = int(message.split(" at step ")[1].split()[0])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(last) in message
    assert torch.load(last, weights_only=True)["global_step"] == step  # written at the bad step
    assert _finite_weights(last)
    assert user_message(info.value) == message  # the command line shows it as one line


class _Poison(L.Callback):
    """Turns the weights into NaN at one step, as an overflow would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.linear_layers()[0].weight.fill_(float("nan"))


def test_nan_weights_never_overwrite_the_last_checkpoint(compose_train, tmp_path):
    cfg = compose_train(*FAST, "+callbacks.poison={_target_:test_lit_nonfinite._Poison,step:30}")
    with pytest.raises(NonFiniteLossError, match="no longer finite, so no checkpoint"):
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    steps_per_epoch = 22  # 700 training points of xor in batches of 32
    assert torch.load(last, weights_only=True)["global_step"] == steps_per_epoch  # epoch 0's
    assert _finite_weights(last)
