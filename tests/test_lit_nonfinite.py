"""A loss that turns NaN or infinite stops the run, pointing at the last good state, which the
guard never overwrites; resuming from it at a lower rate trains at that rate."""

import lightning as L
import pytest
import torch

from manualbp.lit import NonFiniteLossError, read_checkpoint, train, user_message

FAST = ["data=xor", "callbacks=minimal", "logger=csv", "trainer.max_epochs=5",
        "trainer.num_sanity_val_steps=0"]
STEPS = 22  # 700 training points of xor in batches of 32
# Plain SGD whose learning rate grows 1000-fold every epoch: fine at first, then it diverges.
EXPLODING = ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.1",
             "model.scheduler={_target_:torch.optim.lr_scheduler.ExponentialLR,"
             "_partial_:true,gamma:1000}"]


def _largest_weight(path) -> float:
    state = read_checkpoint(path)["state_dict"]
    return max(float(t.abs().max()) for name, t in state.items() if name.startswith("net."))


def test_diverging_loss_names_the_last_good_state_and_its_resume_trains_at_the_lower_rate(
        compose_train, tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        train(compose_train(*FAST, *EXPLODING))
    message = str(info.value)
    assert "train/loss is nan at step" in message or "train/loss is inf at step" in message
    step = int(message.split(" at step ")[1].split()[0])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"the last good state is {last} (step " in message
    assert f"resume from it with a lower learning rate: ckpt_path={last} model.optimizer.lr=" in (
        message)
    good = read_checkpoint(last)
    assert good["global_step"] < step and good["global_step"] % STEPS == 0  # an epoch's end
    assert _largest_weight(last) < 1e3  # sane weights, not the diverged ones
    assert user_message(info.value) == message  # the command line shows it as one line

    # The suggested recovery: the same checkpoint, a lower rate and (the culprit) no schedule.
    lower = ["model.optimizer.lr=0.01", "model.scheduler=null", "trainer.max_epochs=3"]
    resumed = train(compose_train(*FAST, *lower, f"ckpt_path={last}",
                                  f"output_dir={tmp_path}/2"), overrides=lower)
    state = read_checkpoint(resumed.last_ckpt)
    assert [g["lr"] for g in state["optimizer_states"][0]["param_groups"]] == [0.01]
    assert state["global_step"] == 3 * STEPS


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
    with pytest.raises(NonFiniteLossError, match=r"last good state is .*last.ckpt \(step 22, "
                                                 "epoch 0\\)"):
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == STEPS  # epoch 0's
    assert all(bool(torch.isfinite(t).all()) for t in read_checkpoint(last)["state_dict"].values())


def test_divergence_in_the_first_epoch_says_there_is_no_good_state(compose_train, tmp_path):
    cfg = compose_train(*FAST, "+callbacks.poison={_target_:test_lit_nonfinite._Poison,step:3}")
    with pytest.raises(NonFiniteLossError, match="no epoch had finished, so there is no good "
                                                 "state to resume from"):
        train(cfg)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_divergence_right_after_a_resume_points_at_the_checkpoint_resumed_from(compose_train,
                                                                               tmp_path):
    first = train(compose_train(*FAST, "trainer.max_epochs=1"))
    poison = f"+callbacks.poison={{_target_:test_lit_nonfinite._Poison,step:{STEPS + 3}}}"
    cfg = compose_train(*FAST, "trainer.max_epochs=3", f"ckpt_path={first.last_ckpt}",
                        f"output_dir={tmp_path}/2", poison)
    with pytest.raises(NonFiniteLossError, match=f"the last good state is {first.last_ckpt} "
                                                 rf"\(step {STEPS}, epoch 0\)"):
        train(cfg)
