"""The fused BatchNorm ops' bookkeeping of a whole forward in a few launches, not two per op.

Each training call of a Triton BatchNorm op (``fastnl.ops.batch_norm_relu``,
``bn_se_residual_relu``, with a downsampling shortcut's BatchNorm two) updates its modules'
running statistics (one ``_foreach_lerp_``) and counts the batch (``num_batches_tracked +=
1``): two tiny kernels per BatchNorm, 106 in a step of the fused SE-ResNet50, each shorter
than a launch. Inside :func:`deferred_running_stats` (the fused
model's training forward) the updates are collected and made when the forward ends: one
``_foreach_lerp_`` per momentum value over every running mean and variance (on CUDA a kernel
per 64 tensors) and one ``_foreach_add_`` over every counter. The values are those of the
updates made one by one (each tensor is updated from its own batch statistics, with the same
formula and the same rounding); a tensor updated twice in one forward has the earlier updates
made first. Under ``torch.compile`` nothing is deferred.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()


class _Pending:
    __slots__ = ("lerps", "counters", "seen")

    def __init__(self):
        self.lerps: dict = {}  # momentum -> ([running tensors], [batch statistics])
        self.counters: list = []
        self.seen: set = set()

    def claim(self, tensors) -> None:
        """Note ``tensors`` as pending; where one is pending already, make the earlier updates
        first (lerps do not commute, and one tensor twice in a foreach list would race)."""
        keys = {(t.untyped_storage()._cdata, t.storage_offset()) for t in tensors}
        if keys & self.seen:
            self.flush()
        self.seen |= keys

    def flush(self) -> None:
        with torch.no_grad():
            for momentum, (running, batch) in self.lerps.items():
                torch._foreach_lerp_(running, batch, momentum)
            if self.counters:
                torch._foreach_add_(self.counters, 1)
        self.lerps, self.counters, self.seen = {}, [], set()


def _pending() -> _Pending | None:
    stack = getattr(_local, "stack", None)
    if not stack or torch.compiler.is_compiling():
        return None
    return stack[-1]


@contextlib.contextmanager
def deferred_running_stats(enabled: bool = True):
    """Collect the fused BatchNorm ops' running-statistics updates and batch counts made inside,
    and make them on exit (also when the block raises: the modules that ran are updated, as
    they would be one by one)."""
    if not enabled or torch.compiler.is_compiling():
        yield
        return
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    pending = _Pending()
    stack.append(pending)
    try:
        yield
    finally:
        stack.pop()
        pending.flush()


def lerp_running(running: list, batch: list, momentum: float) -> None:
    """``running[i] += momentum * (batch[i] - running[i])`` for each i, now or, inside
    :func:`deferred_running_stats`, when it ends."""
    pending = _pending()
    if pending is None:
        with torch.no_grad():
            torch._foreach_lerp_(running, batch, float(momentum))
        return
    pending.claim(running)
    selves, ends = pending.lerps.setdefault(float(momentum), ([], []))
    selves.extend(running)
    ends.extend(batch)


def count_batch(counter: torch.Tensor, now: bool = False) -> None:
    """``counter += 1`` now (``now``: the caller reads it next, as ``momentum=None`` does) or,
    inside :func:`deferred_running_stats`, when it ends."""
    pending = _pending()
    if pending is not None:
        pending.claim([counter])
        if not now:
            pending.counters.append(counter)
            return
    counter.add_(1)
