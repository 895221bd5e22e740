"""convert with a learning rule never leaves a layer silently on backprop."""

import pytest
import torch
from torch import nn

import manualbp as mb
from tests.test_convert_real import Conv1D


def test_a_rule_refuses_conv1d_layers_it_cannot_serve_and_skip_keeps_them_on_backprop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Conv1D(3, 6))
    with pytest.raises(ValueError, match=r"rule 'feedback_alignment' is not implemented for "
                                         r"Hugging Face Conv1D layers, got 1: 2; keep them"):
        mb.convert(model, rule="fa")
    assert type(model[0]) is nn.Linear  # refused before anything was converted
    out, rep = mb.convert(model, rule="fa", skip=("2",), report=True)
    assert type(out[0]) is mb.Linear and out[0].rule == "feedback_alignment"
    assert ("2", "listed in skip") in rep.skipped
