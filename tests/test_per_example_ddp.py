"""per_example under DDP (2 CPU processes, gloo) and inside torch.compile."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_ddp import _free_port
from torch import nn

import manualbp as mb


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "fused":
        return mb.MLP([6, 8, 3], activation="tanh", dtype=torch.float64)
    return nn.Sequential(mb.Linear(6, 8, activation="tanh", dtype=torch.float64),
                         mb.Linear(8, 3, dtype=torch.float64))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,),
                                                                              generator=g)


def _worker(rank: int, world: int, port: int, kind: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(_build(kind))
    x, y = _data()
    shard = slice(rank * 4, rank * 4 + 4)
    with mb.per_example(model, max_norm=0.05) as pe:  # each rank clips its own examples
        F.cross_entropy(model(x[shard]), y[shard]).backward()
    if rank == 0:
        torch.save({"grads": [p.grad for p in model.parameters()], "norms": pe.norms}, out)
    dist.barrier()
    del model
    dist.destroy_process_group()
    os._exit(0)  # as tests/test_ddp.py: skip a gloo teardown that sometimes aborts


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fused", "per_layer"])
def test_ddp_ranks_clip_their_own_examples_and_average_to_one_process(kind, tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), kind, out), nprocs=2, join=True)
    saved = torch.load(out)
    model = _build(kind)
    x, y = _data()
    with mb.per_example(model, max_norm=0.05) as pe:  # one process, the whole batch
        F.cross_entropy(model(x), y).backward()
    assert bool((pe.norms > 0.05).all())  # the clip acts on every example
    torch.testing.assert_close(saved["norms"], pe.norms[:4], rtol=1e-10, atol=1e-12)
    for got, p in zip(saved["grads"], model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_backprop_step_inside_the_block_matches_eager():
    torch.manual_seed(0)
    model = mb.MLP([5, 7, 4], activation="tanh", dtype=torch.float64)
    step = torch.compile(lambda x, y: model.backprop(x, y, accumulate=False), fullgraph=True)
    for _ in range(2):  # a second batch runs the compiled step again with new data
        x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
        with mb.per_example(model, max_norm=0.3) as compiled:
            step(x, y)
        got = [p.grad.clone() for p in model.parameters()]
        with mb.per_example(model, max_norm=0.3) as eager:
            model.backprop(x, y, accumulate=False)
        torch.testing.assert_close(compiled.norms, eager.norms, rtol=1e-12, atol=0)
        for g, p in zip(got, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-15)


def test_compiled_autograd_forward_inside_the_block_is_refused_plainly():
    layer = nn.Sequential(mb.Linear(5, 4))
    compiled = torch.compile(layer, fullgraph=True)
    with pytest.raises(RuntimeError, match="per_example: torch.compile or torch.func of a model"):
        with mb.per_example(layer):
            compiled(torch.randn(3, 5)).sum().backward()
