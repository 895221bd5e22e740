"""LightningModule around an MLP of manualbp layers: one model_step, thin train/val/test steps."""

import logging
from functools import partial

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Accuracy, MaxMetric, MeanMetric, MeanSquaredError, MinMetric

import manualbp as mb
from manualbp.lit.ckpt_io import RUN_KEY
from manualbp.lit.heads import head_loss, head_preds, head_probs, out_units, resolve_head
from manualbp.lit.twin import build_twin, twin_forward
from manualbp.rules import check_rule, redraw

log = logging.getLogger(__name__)

BACKENDS = ("manual", "autograd")
INITS = ("torch", "he", "xavier")


def initialise(layers, init: str) -> None:
    """Redraw each W[i] and zero b[i], or keep nn.Linear's init ("torch").

    "he": normal with std sqrt(2 / n_in), which keeps the size of ReLU signals (and deltas)
    from layer to layer; "xavier": std sqrt(2 / (n_in + n_out)), the usual start for sigmoid and
    tanh. A learning rule's random feedback matrices are redrawn the same way, after all the
    weights (so the weights do not depend on the rule).
    """
    if init not in INITS:
        raise ValueError(f"model.init: expected one of {INITS}, got {init!r}")
    if init == "torch":
        return
    for layer in layers:
        if init == "he":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        else:
            nn.init.xavier_normal_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    for layer in layers:
        redraw(layer, init)


def layer_sizes(num_features, num_classes, hidden_sizes, sizes, head) -> list[int]:
    """[n_0, hidden..., n_L] with n_0 and n_L taken from the data; explicit sizes must agree."""
    n_out = out_units(head, num_classes)
    if sizes is None:
        return [num_features, *[int(s) for s in hidden_sizes], n_out]
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or sizes[0] != num_features or sizes[-1] != n_out:
        outputs = f"{n_out} outputs for {num_classes} classes with a {head} head"
        raise ValueError(
            f"model.sizes: expected [{num_features}, ..., {n_out}] to fit the data "
            f"({num_features} features, {outputs}), got {sizes}; remove model.sizes and set "
            "model.hidden_sizes: the data decide the first and last width"
        )
    return sizes


class LitMLP(L.LightningModule):
    """Trains an injected manualbp network with the hand-written backward or its autograd twin.

    Args:
        net: callable building the network from (sizes, activation), e.g. a Hydra partial of
            mb.MLP; it must return a module whose `layers` are mb.Linear.
        optimizer: callable taking `params`, e.g. a partial of torch.optim.Adam.
        num_features: input width (from the datamodule).
        num_classes: classes, or regression targets (from the datamodule).
        task: "multiclass", "binary" or "regression" (from the datamodule). Default: multiclass.
        hidden_sizes: widths of the hidden layers. Default: () (one layer of neurons).
        activation: hidden activation, a key of mb.ACTIVATIONS. Default: "relu".
        backend: "manual" (mb.MLP, hand-written backward) or "autograd" (nn.Linear twin with
            the same initial weights). Default: "manual".
        head: "auto", "softmax", "logistic" or "identity" (see heads.py). Default: "auto".
        init: "torch" (nn.Linear's uniform), "he" or "xavier" (see initialise). Default: torch.
        sizes: all widths [n_0, ..., n_L]; None derives them from the data. Default: None.
        scheduler: optional callable taking `optimizer`, e.g. a partial of an LR scheduler.
        scheduler_monitor: metric a ReduceLROnPlateau-like scheduler watches. Default: val/loss.
        rule: learning rule of the network (manualbp.rules: backprop, feedback_alignment,
            sign_symmetry, kolen_pollack, direct_feedback_alignment or an alias); the manual
            backend only. Default: "backprop".

    Attributes:
        net: the trained network (mb.MLP, or nn.Sequential for the autograd backend).
        activations: activation name of each layer 1..L (the last is "identity").
        head: the resolved head, "softmax", "logistic" or "identity".
        metric_name: "acc" for classification, "mse" for regression (logged as val/acc, ...).
        trace: an mb.Trace a callback sets to have the next training step record a[i], delta[i].
        run_config: the run's data and model config (plain dicts), which the runner sets;
            saved in every checkpoint so that testing or loading it needs nothing else.
    """

    def __init__(self, net, optimizer, num_features: int, num_classes: int,
                 task: str = "multiclass", hidden_sizes=(), activation: str = "relu",
                 backend: str = "manual", head: str = "auto", init: str = "torch", sizes=None,
                 scheduler=None, scheduler_monitor: str = "val/loss",
                 rule: str = "backprop") -> None:
        super().__init__()
        # Partials are kept out of the checkpoint: it must load with torch's weights_only.
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        if backend not in BACKENDS:
            raise ValueError(f"model.backend: expected one of {BACKENDS}, got {backend!r}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backend = backend
        self.head = resolve_head(head, task, num_classes)
        self.rule = rule = check_rule(rule, "model.rule")
        if rule != "backprop" and backend != "manual":
            raise ValueError(
                f"model.rule: expected backprop with backend={backend} (autograd can only "
                f"backprop), got {rule!r}; use model.backend=manual for a learning rule"
            )
        rule_kw = {} if rule == "backprop" else {"rule": rule}
        mlp = net(sizes=layer_sizes(num_features, num_classes, hidden_sizes, sizes, self.head),
                  activation=activation, **rule_kw)
        initialise(mlp.layers, init)
        self.activations = [layer.activation for layer in mlp.layers]
        self.net = mlp if backend == "manual" else build_twin(mlp)
        self.trace: mb.Trace | None = None
        self.run_config: dict | None = None
        self._configured_lr: float | None = None  # the optimizer's lr as configured now
        self._restored_lr: float | None = None  # the configured lr of the checkpoint resumed

        if self.head == "identity":
            self.metric_name, best, metric = "mse", MinMetric, MeanSquaredError
        else:
            self.metric_name, best = "acc", MaxMetric
            metric = partial(Accuracy, task="multiclass", num_classes=num_classes)
        self.train_metric, self.val_metric, self.test_metric = metric(), metric(), metric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_best = best()
        self.val_best.persistent(True)  # a resume carries on with the best so far

    def forward(self, x: Tensor, trace: mb.Trace | None = None) -> Tensor:
        """z[L] (logits) of x (N, num_features); a trace records a[i] and delta[i]."""
        if self.backend == "manual":
            return self.net(x, trace=trace)
        return twin_forward(self.net, x, trace)

    def linear_layers(self) -> list[nn.Linear]:
        """The L linear layers in order (mb.Linear or nn.Linear), holding W[i] and b[i]."""
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)]

    def evaluate(self, x: Tensor, trace: mb.Trace | None = None) -> Tensor:
        """Logits of raw float32 x outside the Trainer's loops, cast and autocast as it would."""
        trainer = self.trainer
        x = trainer.precision_plugin.convert_input(x).to(self.device)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            return self(x, trace)

    def model_step(self, batch, trace: mb.Trace | None = None):
        """(mean loss, predictions, targets) of one batch; the steps below share it."""
        x, y = batch
        logits = self(x, trace)
        loss = head_loss(self.head, logits, y, manual=self.backend == "manual")
        return loss, head_preds(self.head, logits), y

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        if batch[0].shape[0] == 0:  # an empty Poisson-sampled batch (DP-SGD): no step
            return None
        loss, preds, y = self.model_step(batch, self.trace)
        self.train_metric(preds, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log(f"train/{self.metric_name}", self.train_metric, on_step=False, on_epoch=True)
        return loss

    def on_train_start(self) -> None:
        self._apply_configured_lr()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = {"config": self.run_config, "optimizer_lr": self._configured_lr}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored_lr = (checkpoint.get(RUN_KEY) or {}).get("optimizer_lr")
        for name, value in self.val_best.state_dict(prefix="val_best.").items():
            checkpoint["state_dict"].setdefault(name, value)  # checkpoints from before it was kept

    def _apply_configured_lr(self) -> None:
        """After a resume with another model.optimizer.lr, train at that rate.

        The restored optimizer state carries the old rate. Without a scheduler the new rate
        replaces it; with one, the rates (and the scheduler's base rates) are scaled by
        new / old: the rate a run started at the new rate would have at this epoch.
        """
        old, new = self._restored_lr, self._configured_lr
        if old is None or new is None or old == new or not self.trainer.optimizers:
            return
        scheduled = bool(self.trainer.lr_scheduler_configs)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * new / old if scheduled else new
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * new / old
        for config in self.trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * new / old for lr in config.scheduler.base_lrs]
        if self.trainer.is_global_zero:
            log.info("model.optimizer.lr is %g, the checkpoint's run used %g: the restored "
                     "optimizer now trains at the new rate", new, old)

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, preds, y = self.model_step(batch)
        self.val_loss(loss, weight=y.shape[0])
        self.val_metric(preds, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"val/{self.metric_name}", self.val_metric, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return  # a few batches of the weights before training: not a result
        self.val_best(self.val_metric.compute())  # torchmetrics syncs over DDP ranks
        self.log(f"val/{self.metric_name}_best", self.val_best.compute(), sync_dist=True,
                 prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, preds, y = self.model_step(batch)
        self.test_loss(loss, weight=y.shape[0])
        self.test_metric(preds, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log(f"test/{self.metric_name}", self.test_metric, on_step=False, on_epoch=True)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """Class probabilities (N, C) of the batch's x (the outputs for regression)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return head_probs(self.head, self(x))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        self._configured_lr = optimizer.defaults.get("lr")
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch",
                                 "monitor": self.hparams.scheduler_monitor}}
