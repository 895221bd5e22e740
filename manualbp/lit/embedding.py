"""The last hidden layer's view of the validation set, for TensorBoard's embedding projector."""

import lightning as L

import manualbp as mb
from manualbp.lit.tb_logger import tensorboard_logger


class HiddenEmbedding(L.Callback):
    """At the end of fit, logs a[L-1] of every validation row, labelled by its class.

    In the PROJECTOR tab (PCA, t-SNE or UMAP of these vectors, coloured by the `label`
    metadata) well-trained hidden units show one cluster per class: the last layer only has to
    draw straight lines between them. Nets without a hidden layer have nothing to show.
    Global rank zero only.

    Args:
        max_points: validation rows embedded at most. Default: 2000.
    """

    def __init__(self, max_points: int = 2000) -> None:
        self.max_points = max_points

    def on_fit_end(self, trainer, pl_module) -> None:
        tb = tensorboard_logger(trainer)
        if tb is None or len(pl_module.linear_layers()) < 2:
            return
        x, y = trainer.datamodule.full_val_tensors()
        x, y = x[: self.max_points], y[: self.max_points]
        trace = mb.Trace()
        pl_module.evaluate(x, trace)
        hidden = trace.a[-2].float().cpu()  # a[L-1]: (N, n_{L-1})
        names = getattr(trainer.datamodule, "class_names", None)
        if names and y.dim() == 1:
            labels = [names[k] for k in y.tolist()]
        else:  # regression: the (first) target value
            labels = [f"{v:.3g}" for v in y.reshape(y.shape[0], -1)[:, 0].tolist()]
        tb.experiment.add_embedding(hidden, metadata=labels, global_step=trainer.global_step,
                                    tag="val_last_hidden")
