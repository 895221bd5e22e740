"""The decision boundary of a 2-D classifier as an image, drawn with torch alone (no matplotlib).

Each pixel is a point of the input plane, coloured by the class the network predicts there,
pale where it hesitates and saturated where it is sure; the data points sit on top as discs of
their true class's colour with a dark rim. Logged to TensorBoard's IMAGES tab every epoch, the
pictures show how the hidden layers bend the boundary as training goes on.
"""

import lightning as L
import torch
from torch import Tensor

from manualbp.lit.heads import head_probs
from manualbp.lit.tb_logger import tensorboard_logger

# One RGB colour per class (cycled past 10), chosen to stay apart when paled.
PALETTE = torch.tensor([
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
], dtype=torch.float32) / 255.0


def class_colours(num_classes: int) -> Tensor:
    """(num_classes, 3) RGB in [0, 1]."""
    return PALETTE[torch.arange(num_classes) % len(PALETTE)]


def plane_grid(x: Tensor, size: int, margin: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel centres covering the points x (N, 2) with a margin: (size*size, 2), lows, spans."""
    lo, hi = x.min(0).values, x.max(0).values
    pad = (hi - lo).clamp_min(1e-6) * margin
    lo, span = lo - pad, (hi - lo) + 2 * pad
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # (size,) in (0, 1)
    rows, cols = torch.meshgrid(t, t, indexing="ij")
    # Row 0 is the top of the image, so the second coordinate grows upwards as on paper.
    grid = torch.stack([lo[0] + cols * span[0], lo[1] + (1 - rows) * span[1]], dim=-1)
    return grid.reshape(-1, 2), lo, span


def render_boundary(probs: Tensor, x: Tensor, y: Tensor, lo: Tensor, span: Tensor,
                    size: int, radius: int = 3) -> Tensor:
    """Draw class regions and points into a (size, size, 3) uint8 image.

    Args:
        probs: (size*size, C) class probabilities at the pixels of plane_grid.
        x: (N, 2) points, y: (N,) their classes.
        lo, span: the plane's lower corner and extent, as plane_grid returned them.
        size: image width and height in pixels.
        radius: radius of a point's disc in pixels.
    """
    num_classes = probs.shape[1]
    colours = class_colours(num_classes)
    confidence, pred = probs.float().max(dim=1)  # (size*size,)
    # Pale (0.25) at chance level, towards full colour (0.85) where the network is sure.
    sure = ((confidence - 1 / num_classes) / (1 - 1 / num_classes)).clamp(0, 1)
    strength = (0.25 + 0.6 * sure)[:, None]
    image = (1 - strength) + strength * colours[pred]  # blend with white, (size*size, 3)
    image = image.reshape(size, size, 3)

    col = ((x[:, 0] - lo[0]) / span[0] * size).long()  # (N,) pixel of each point
    row = ((1 - (x[:, 1] - lo[1]) / span[1]) * size).long()
    _paint(image, row, col, _disc(radius), torch.full((x.shape[0], 3), 0.1))  # dark rim
    _paint(image, row, col, _disc(radius - 1), colours[y.long()])  # class colour inside
    return (image * 255).round().to(torch.uint8)


def _disc(radius: int) -> Tensor:
    """(K, 2) row and column offsets of the pixels within radius of a centre."""
    offsets = torch.arange(-radius, radius + 1)
    dr, dc = torch.meshgrid(offsets, offsets, indexing="ij")
    inside = dr * dr + dc * dc <= radius * radius
    return torch.stack([dr[inside], dc[inside]], dim=-1)


def _paint(image: Tensor, row: Tensor, col: Tensor, disc: Tensor, colours: Tensor) -> None:
    """Fill a disc around each point (row, col) with its colour (N, 3), clipped to the image."""
    size = image.shape[0]
    r = row[:, None] + disc[:, 0]  # (N, K)
    c = col[:, None] + disc[:, 1]
    fill = colours[:, None, :].expand(-1, disc.shape[0], 3)  # (N, K, 3)
    inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
    image[r[inside], c[inside]] = fill[inside]


class DecisionBoundary(L.Callback):
    """Logs an image `decision_boundary` of a 2-D data set's classes after each validation.

    Does nothing unless the datamodule says is_2d and the task is classification. Draws the
    training points (at most `max_points`). Global rank zero only.

    Args:
        size: image width and height in pixels. Default: 192.
        max_points: points drawn at most. Default: 600.
    """

    def __init__(self, size: int = 192, max_points: int = 600) -> None:
        self.size = size
        self.max_points = max_points

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        tb = tensorboard_logger(trainer)
        if tb is None or trainer.sanity_checking or not getattr(dm, "is_2d", False):
            return
        if pl_module.head == "identity":
            return
        x, y = dm.full_train_tensors()
        x, y = x[: self.max_points], y[: self.max_points]
        grid, lo, span = plane_grid(x, self.size)
        probs = head_probs(pl_module.head, pl_module.evaluate(grid)).float().cpu()
        image = render_boundary(probs, x, y, lo, span, self.size)
        tb.experiment.add_image("decision_boundary", image, trainer.global_step,
                                dataformats="HWC")
