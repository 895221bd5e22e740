"""manualbp.lit.load(path): a trained network back from its checkpoint, outside train.py."""

import inspect

from hydra.utils import instantiate
from torch import nn

from manualbp.lit.ckpt_io import read_checkpoint
from manualbp.lit.module import LitMLP
from manualbp.lit.run_config import stored_config


def load(path, map_location="cpu") -> nn.Module:
    """The network a harness checkpoint holds, with its trained weights, in eval mode.

    Architecture, activation and head come from the checkpoint itself, read with
    torch.load(weights_only=True): `load(".../checkpoints/best-epoch029.ckpt")(x)` gives the
    logits z[L] of x (N, num_features), an mb.MLP for the manual backend (nn.Sequential for
    autograd). Apply the head yourself: softmax over classes, sigmoid for a logistic head.

    Args:
        path: a .ckpt file written by `python train.py` (last.ckpt, best-*.ckpt, ...).
        map_location: where the tensors go, as for torch.load. Default: "cpu".

    Raises:
        CheckpointError: the file is missing, empty, corrupt or not a harness checkpoint.
    """
    checkpoint = read_checkpoint(path, map_location)
    stored = stored_config(checkpoint, path)
    net = stored["model"]["net"] if stored else {"_target_": "manualbp.MLP", "_partial_": True}
    hparams = checkpoint.get("hyper_parameters") or {}
    accepted = set(inspect.signature(LitMLP).parameters) - {"net", "optimizer", "scheduler"}
    model = LitMLP(net=instantiate(net, _convert_="all"), optimizer=None,
                   **{k: v for k, v in hparams.items() if k in accepted})
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.net.eval()
