"""Memory of one training step: bytes saved for backward, and the step's peak allocation.

Saved for backward: a saved_tensors_hooks pack hook sees every tensor a graph node saves; views
of one buffer (W and W^T, say) are counted once, by storage. "all" counts every storage saved;
"new" leaves out the storages of the parameters and of the batch, which exist anyway, so it is the
memory the graph alone keeps alive between forward and backward.

Peak: on CUDA, torch.cuda.max_memory_allocated over forward + loss + backward, above what was
allocated before. On CPU torch keeps no such counter, so the step runs under torch.profiler with
profile_memory=True and the peak is read from its allocation events: the highest running total
of CPU bytes allocated during the step, above the total at its start. Gradients are set to None
first, so they are part of the peak on both devices.
"""

import contextlib
import os
import sys

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from variants import Variant


def saved_bytes(v: Variant, x: Tensor, y: Tensor) -> dict[str, int]:
    """Bytes of distinct storages the forward + loss save for backward: all, and new."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    v.model.zero_grad(set_to_none=True)
    with saved_tensors_hooks(pack, lambda t: t):
        loss = v.fill_grads(x, y) if v.name == "backprop" else v.loss(x, y)  # no graph: 0
    del loss
    existing = {p.untyped_storage().data_ptr() for p in v.model.parameters()}
    existing |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    new = sum(n for ptr, n in storages.items() if ptr not in existing)
    return {"all": sum(storages.values()), "new": new}


def peak_bytes(v: Variant, x: Tensor, y: Tensor) -> int | None:
    """Peak bytes allocated during forward + loss + backward, above the start; None if unknown."""
    v.model.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        v.fill_grads(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    if x.device.type == "cpu":
        return _cpu_peak(lambda: v.fill_grads(x, y))
    return None


def _cpu_peak(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # the allocation events live in the profiler's (experimental) event tree
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    events = []  # (time, bytes allocated (+) or freed (-), running total after it)
    stack = list(tree)
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if hasattr(fields, "alloc_size") and hasattr(fields, "total_allocated"):
            if str(fields.device).startswith("cpu"):
                events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(node.children)
    if not events:
        return None
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (the profiler's C++ start/stop lines, two per step measured)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
