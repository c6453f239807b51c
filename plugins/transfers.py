"""Every host<->device move of the defended step, in one place.

The defended step must never make the host wait for the device: on a GPU, one
``.item()`` per step stalls the host until every kernel queued so far has
run, and vLLM's step already has the one synchronization it needs (reading
the sampled tokens back). So the step's bookkeeping (slots, lengths, which
rows are live, what is pending) stays in host Python, and the device gets
what it needs of it through two helpers:

- :meth:`Staging.to_device`: host values into one preallocated CPU buffer
  (pinned where CUDA is), then one ``non_blocking`` copy to the device;
- :func:`to_host`: a device tensor's values back on the host, for the RPCs
  that report the fidelity counters, never inside a step.

:class:`SyncAudit` checks the rule on a running engine (the ``sync_audit``
setting of the defense): it counts, per guarded block, the calls that read
device values on the host or build device tensors from host values outside
:class:`Staging`, and on CUDA it also runs the block under
``torch.cuda.set_sync_debug_mode("error")``, so that any synchronizing call
fails the step.

Not for: the models or the per-token math.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

_NUMPY = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.float64: np.float64}
_ALIGN = 8
# Copies issued by every Staging of this process (what SyncAudit reports as staged).
_copies = 0
# Above 0 while Staging handles its own host buffer (not device values): SyncAudit looks away.
_host_only = 0


def staged_copies() -> int:
    return _copies


def to_host(tensor: torch.Tensor) -> Any:
    """``tensor``'s values as Python numbers: a device-to-host read, so only where a read is due (an RPC)."""
    return tensor.tolist()


@dataclass
class _Block:
    data: torch.Tensor  # uint8, pinned where the device is CUDA
    host: np.ndarray  # the same memory, written by numpy (no torch call, no device)
    offset: int = 0
    event: Any = None  # torch.cuda.Event recorded after the block's last copy

    def idle(self) -> bool:
        return self.event is None or self.event.query()


class Staging:
    """A preallocated CPU buffer that a step's host values pass through on their way to the device.

    Call :meth:`begin` once per step, then :meth:`to_device` as often as
    needed: each call writes its arrays side by side at the next free offset
    and issues one ``non_blocking`` copy, so nothing written earlier in the
    step is overwritten while the device may still be reading it. At the next
    :meth:`begin` the buffer is reused if the device has finished its copies
    (always, under vLLM, whose step waits for its sampled tokens), and
    otherwise a spare buffer takes over: no call here waits for the device,
    short of a caller queueing steps far ahead of it.
    """

    max_spares = 8

    def __init__(self, device: torch.device | str, pin: bool | None = None, capacity: int = 1 << 14) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pin = (self.cuda and torch.cuda.is_available()) if pin is None else bool(pin)
        self.block = self._new_block(capacity)
        self.spares: list[_Block] = []

    def _new_block(self, nbytes: int) -> _Block:
        global _host_only
        _host_only += 1
        try:
            data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            return _Block(data, data.numpy())
        finally:
            _host_only -= 1

    def begin(self) -> None:
        """Start a step: from here on, to_device may reuse the buffer's memory."""
        if self.block.idle():
            self.block.offset = 0
            return
        for i, spare in enumerate(self.spares):
            if spare.idle():
                self.spares[i], self.block = self.block, spare
                self.block.offset = 0
                return
        if len(self.spares) >= self.max_spares:
            # Only a caller that never lets the device catch up gets here.
            oldest = self.spares.pop(0)
            oldest.event.synchronize()
            self.spares.append(self.block)
            self.block = oldest
        else:
            self.spares.append(self.block)
            self.block = self._new_block(self.block.data.numel())
        self.block.offset = 0

    def _reserve(self, nbytes: int) -> int:
        block = self.block
        start = -(-block.offset // _ALIGN) * _ALIGN
        if start + nbytes > block.data.numel():
            # A bigger buffer for the rest of the step; the old one stays valid for
            # copies in flight (the CUDA host allocator keeps it until they finish).
            size = block.data.numel()
            while size < nbytes:
                size *= 2
            self.block = block = self._new_block(size)
            start = 0
        block.offset = start + nbytes
        return start

    def to_device(self, *arrays: Sequence[Any] | np.ndarray,
                  dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, ...]:
        """Each array (a list or numpy array of any shape) as a ``dtype`` tensor on the device, in one copy."""
        global _copies
        np_dtype = _NUMPY[dtype]
        host = [np.asarray(a, dtype=np_dtype) for a in arrays]
        item = np.dtype(np_dtype).itemsize
        total = sum(h.size for h in host) * item
        start = self._reserve(total)
        view = self.block.host[start : start + total].view(np_dtype)
        offset = 0
        for h in host:
            view[offset : offset + h.size] = h.reshape(-1)
            offset += h.size
        moved = self.block.data[start : start + total].to(self.device, non_blocking=True, copy=True).view(dtype)
        if self.cuda:
            if self.block.event is None:
                self.block.event = torch.cuda.Event()
            self.block.event.record()
        _copies += 1
        out = []
        offset = 0
        for h in host:
            out.append(moved[offset : offset + h.size].view(h.shape))
            offset += h.size
        return tuple(out)

    def memory_bytes(self) -> int:
        return sum(b.data.numel() for b in [self.block, *self.spares])


# What reads device values on the host: a synchronization on a GPU. Boolean-mask
# indexing (checked separately) and ops whose output size depends on the data
# (nonzero, unique, ...) read too.
HOST_READS = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__",
    "__array__", "__repr__", "__str__", "__format__", "equal", "allclose", "nonzero", "argwhere",
    "masked_select", "unique", "unique_consecutive", "repeat_interleave", "_local_scalar_dense",
})
# What builds a tensor from host values: a blocking copy when the target is a GPU.
HOST_BUILDS = frozenset({"tensor", "as_tensor", "asarray", "from_numpy", "new_tensor"})


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class _CountingMode(TorchFunctionMode):
    """Sees every torch call in the guarded block and records host reads and host builds by name."""

    def __init__(self, audit: "SyncAudit") -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.audit.paused or _host_only:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        masked = name in ("__getitem__", "__setitem__") and len(args) > 1 and _bool_index(args[1])
        if name in HOST_READS or masked:
            self.audit.host_reads[name] += 1
        elif name in HOST_BUILDS:
            self.audit.host_builds[name] += 1
        result = func(*args, **kwargs)
        if name in ("to", "copy_") and args and isinstance(args[0], torch.Tensor):
            src, dst = (args[0], result) if name == "to" else (args[1] if len(args) > 1 else None, args[0])
            if (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
                    and src.device.type != "cpu" and dst.device.type == "cpu"):
                self.audit.host_reads[name] += 1
        return result


class SyncAudit:
    """Counts host reads and unstaged host builds in guarded blocks; on CUDA, makes any sync in them an error.

    One-time setup that a step may trigger (a runner built for the first ADS
    request) runs under :meth:`exempt`: it is not part of the per-step path.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.steps = 0
        self.host_reads: Counter[str] = Counter()
        self.host_builds: Counter[str] = Counter()
        self.staged = 0
        self.exempted = 0
        self.paused = 0
        self._depth = 0
        self._outer_mode: int | str | None = None

    @contextlib.contextmanager
    def guard(self, step: bool = False) -> Iterator[None]:
        """Audit the block; ``step`` counts it as one defended step."""
        before = staged_copies()
        with _CountingMode(self):
            if self.cuda:
                self._outer_mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self.cuda:
                    torch.cuda.set_sync_debug_mode(self._outer_mode)
        self.staged += staged_copies() - before
        self.steps += int(step)

    @contextlib.contextmanager
    def exempt(self) -> Iterator[None]:
        """Within a guarded block, run one-time setup unaudited (outside one, just run it)."""
        if not self._depth:
            yield
            return
        self.paused += 1
        self.exempted += 1
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._outer_mode)
        try:
            yield
        finally:
            self.paused -= 1
            if self.cuda:
                torch.cuda.set_sync_debug_mode("error")

    def report(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "host_reads": sum(self.host_reads.values()),
            "host_builds": sum(self.host_builds.values()),
            "staged_copies": self.staged,
            "exempted_setups": self.exempted,
            "by_call": dict(self.host_reads + self.host_builds),
            "sync_debug_mode": "error" if self.cuda else None,
        }
