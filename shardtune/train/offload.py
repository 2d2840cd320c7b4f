"""Activation offloading: during the forward, large saved activations move to pinned CPU memory; backward brings them
back. `OffloadActivations` owns the bookkeeping (which tensors, dedupe, when a GPU copy may be freed, prefetch order);
a mover owns the copies (`CudaMover`: non-blocking copies on one side stream, ordered by events).

The unit moved is a tensor's whole storage, as raw bytes: every saved view of it (the same input saved by the q, k
and v projections, the 2-D view a matmul keeps) shares one host copy and one copy back, and each view is rebuilt with
its own offset, sizes and strides, so backward sees the same bits at the same alignment.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef


def pool_bucket(nbytes: int) -> int:
    """The pinned buffer size that serves `nbytes`: rounded up to an eighth of its power of two (at most 12.5% more),
    so buffers are reused across steps whose tensor sizes vary a little (packed rows)."""
    if nbytes <= 1 << 16:
        return 1 << 16
    step = 1 << (nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


class PinnedPool:
    """Pinned host buffers kept across steps. Pinning memory (cudaHostAlloc) runs at a few GB/s, slower than the copy
    it serves, so a buffer is pinned once and reused by every later step. Every use of a buffer is a copy on the
    mover's one side stream, so stream order alone keeps a reused buffer from being overwritten while a copy reads it.
    Free buffers beyond the most ever in use at once are let go."""

    def __init__(self, allocate=None):
        self.allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self.free: dict[int, list[torch.Tensor]] = {}
        self.in_use = self.high_water = self.free_bytes = 0
        self.pinned_bytes = 0  # every buffer ever allocated (for the stats line)

    def get(self, nbytes: int) -> torch.Tensor:
        size = pool_bucket(nbytes)
        bucket = self.free.get(size)
        if bucket:
            buf = bucket.pop()
            self.free_bytes -= size
        else:
            buf = self.allocate(size)
            self.pinned_bytes += size
        self.in_use += size
        self.high_water = max(self.high_water, self.in_use)
        return buf[:nbytes]

    def put(self, view: torch.Tensor) -> None:
        buf = view._base if view._base is not None else view
        size = buf.numel()
        self.in_use -= size
        if self.free_bytes + self.in_use + size <= self.high_water:
            self.free.setdefault(size, []).append(buf)
            self.free_bytes += size


class CudaMover:
    """Copies between one CUDA device and pinned host memory on a side stream; every copy returns an event that the
    compute stream waits on before it uses (or frees) the device side. Host buffers come from a `PinnedPool`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = PinnedPool()

    def accepts(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda"

    def to_host(self, raw: torch.Tensor):
        host = self.pool.get(raw.numel())
        self.stream.wait_stream(torch.cuda.current_stream(raw.device))  # the activation is written before we read
        with torch.cuda.stream(self.stream):
            host.copy_(raw, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return host, done

    def to_device(self, host: torch.Tensor):
        # allocated on the side stream, so the copy starts at once (waiting for the compute stream here would queue
        # every prefetch behind all backward work already queued); the block is marked as used by the compute stream,
        # so it is not reused before compute's reads of it are done
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            raw = torch.empty(host.shape, dtype=torch.uint8, device=self.device)
            raw.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        raw.record_stream(compute)
        return raw, done

    def release(self, host: torch.Tensor) -> None:
        """The host copy is no longer needed: its buffer goes back to the pool (copies that still read it are queued
        on the side stream ahead of any later use)."""
        self.pool.put(host)

    def done(self, event) -> bool:
        return event.query()

    def wait(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


@dataclass
class OffloadStats:
    moved_bytes: int = 0          # bytes copied to the host (each storage once)
    moved_storages: int = 0
    moved_saves: int = 0          # saved tensors served by a host copy (several per storage when deduped)
    kept_small_bytes: int = 0     # below min_bytes
    kept_param_saves: int = 0     # parameters and views of parameters
    kept_other_saves: int = 0     # other devices (CPU), tensor subclasses
    kept_partial_bytes: int = 0   # a small view of a much larger storage (moving it would move the whole storage)
    fetched_bytes: int = 0        # bytes copied back to the device in backward
    prefetched_bytes: int = 0     # of those, copied ahead of their first use

    def add(self, other: "OffloadStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def format(self) -> str:
        return (f"offload: {self.moved_bytes / 2**20:.1f} MiB in {self.moved_storages} storages "
                f"({self.moved_saves} saved tensors) to host, {self.fetched_bytes / 2**20:.1f} MiB back "
                f"({self.prefetched_bytes / 2**20:.1f} prefetched); kept on device: "
                f"{self.kept_small_bytes / 2**20:.1f} MiB small, {self.kept_partial_bytes / 2**20:.1f} MiB partial "
                f"views, {self.kept_param_saves} parameter saves")


class _Record:
    """One storage's host copy, and its device copy while one exists (the original until the copy to the host is
    done, or the copy back); `event` must be waited on before the device copy is used or freed."""

    __slots__ = ("seq", "host", "nbytes", "device_raw", "event", "unpacks_left", "prefetched")

    def __init__(self, seq: int, raw: torch.Tensor, host: torch.Tensor, event):
        self.seq, self.host, self.nbytes = seq, host, raw.numel()
        self.device_raw, self.event = raw, event
        self.unpacks_left = 0
        self.prefetched = False


class _Packed:
    """What autograd keeps in place of a moved tensor: its storage's record and how to view it."""

    __slots__ = ("record", "dtype", "offset", "size", "stride")

    def __init__(self, record: _Record, t: torch.Tensor):
        self.record, self.dtype = record, t.dtype
        self.offset, self.size, self.stride = t.storage_offset(), t.size(), t.stride()


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t`, as a flat uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _is_param(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class OffloadActivations(saved_tensors_hooks):
    """Saved-tensor hooks for one forward (and its backward): enter it around the forward; backward needs nothing.

    min_bytes: smaller saved tensors stay on the device (a copy costs more than it saves).
    max_inflight_bytes: device bytes kept alive while their copy to the host runs; above it the compute stream waits
    for the oldest copy (no host sync) so its memory can be reused.
    prefetch_bytes: in backward, how many bytes are copied back ahead of use, in reverse forward order.
    Hooks nest: inside a non-reentrant checkpoint region the checkpoint's own hooks win, so only the region's inputs
    are offloaded (and the recompute reads them back through these hooks)."""

    def __init__(self, mover, min_bytes: int = 1 << 20, max_inflight_bytes: int = 1 << 30,
                 prefetch_bytes: int = 1 << 30, stats: OffloadStats | None = None):
        super().__init__(self._pack, self._unpack)
        self.mover, self.min_bytes = mover, min_bytes
        self.max_inflight_bytes, self.prefetch_bytes = max_inflight_bytes, prefetch_bytes
        self.stats = stats if stats is not None else OffloadStats()
        self._seen: dict = {}                 # (storage weak ref, size, version) -> record, during the forward
        self._records: list[_Record] = []     # forward order
        self._inflight: list[_Record] = []    # copies to the host not yet known to be done (FIFO on one stream)
        self._inflight_bytes = 0
        self._in_backward = False
        self._cursor = -1                     # prefetch continues below this index
        self._ahead_bytes = 0                 # prefetched and not yet used
        self._allowance = 0                   # extra prefetch room granted by advance_prefetch in this backward

    def __exit__(self, *exc):
        self._seen.clear()  # dedupe is valid within one forward only
        return super().__exit__(*exc)

    # ------------------------------------------------------------------------------------------------ forward
    def _keep(self, t: torch.Tensor):
        # a parameter is kept as itself (engines swap or refill its data before backward); anything else detached,
        # which keeps its storage without a reference cycle through its own grad_fn
        return t if isinstance(t, nn.Parameter) else t.detach()

    def _pack(self, t: torch.Tensor):
        s = self.stats
        if _is_param(t):
            s.kept_param_saves += 1
            return self._keep(t)
        if type(t) is not torch.Tensor or not self.mover.accepts(t):
            s.kept_other_saves += 1
            return self._keep(t)
        tbytes = t.numel() * t.element_size()
        if tbytes < self.min_bytes:
            s.kept_small_bytes += tbytes
            return t.detach()
        storage = t.untyped_storage()
        if storage.nbytes() > 2 * tbytes:
            s.kept_partial_bytes += tbytes
            return t.detach()
        key = (StorageWeakRef(storage), storage.nbytes(), t._version)
        record = self._seen.get(key)
        if record is None:
            record = self._offload(t)
            self._seen[key] = record
        record.unpacks_left += 1
        s.moved_saves += 1
        return _Packed(record, t)

    def _offload(self, t: torch.Tensor) -> _Record:
        self._release_done()
        raw = _raw_bytes(t)
        host, event = self.mover.to_host(raw)
        record = _Record(len(self._records), raw, host, event)
        self._records.append(record)
        self._inflight.append(record)
        self._inflight_bytes += record.nbytes
        self.stats.moved_bytes += record.nbytes
        self.stats.moved_storages += 1
        while self._inflight_bytes > self.max_inflight_bytes and len(self._inflight) > 1:
            self._drop_inflight(wait=True)
        return record

    def _release_done(self) -> None:
        while self._inflight and self.mover.done(self._inflight[0].event):
            self._drop_inflight(wait=False)

    def _drop_inflight(self, wait: bool) -> None:
        record = self._inflight.pop(0)
        self._inflight_bytes -= record.nbytes
        if wait:
            self.mover.wait(record.event)
        record.device_raw = record.event = None

    # ------------------------------------------------------------------------------------------------ backward
    def _unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        if not self._in_backward:
            self._start_backward()
        record = packed.record
        if record.device_raw is None:
            self._fetch(record)
        elif record.prefetched:
            self._ahead_bytes -= record.nbytes
        record.prefetched = False
        raw = record.device_raw
        self.mover.wait(record.event)
        self._prefetch_below(record.seq)
        record.unpacks_left -= 1
        if record.unpacks_left <= 0:  # autograd holds what it was given; our reference goes
            record.device_raw = record.event = None
        return torch.empty(0, dtype=packed.dtype, device=raw.device).set_(
            raw.untyped_storage(), packed.offset, packed.size, packed.stride)

    def _release_host(self, record: _Record) -> None:
        if record.host is not None and hasattr(self.mover, "release"):
            self.mover.release(record.host)
        record.host = None

    def _fetch(self, record: _Record) -> None:
        if record.host is None:
            raise RuntimeError("train.offload_activations: a saved activation was read after its backward ended "
                               "(a second backward through one forward); turn offloading off for this use")
        record.device_raw, record.event = self.mover.to_device(record.host)
        self.stats.fetched_bytes += record.nbytes

    def _start_backward(self) -> None:
        # copies still in flight keep their device original: backward reads it there (no copy back needed)
        self._inflight, self._inflight_bytes = [], 0
        self._cursor = len(self._records) - 1
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._in_backward = True
        except RuntimeError:  # unpacked outside a backward pass (e.g. reading grad_fn._saved_*): no prefetch
            pass

    def _prefetch_below(self, seq: int) -> None:
        if not self._in_backward:
            return
        i = min(self._cursor, seq - 1)
        while i >= 0 and self._ahead_bytes < self.prefetch_bytes + self._allowance:
            r = self._records[i]
            if r.device_raw is None and r.unpacks_left > 0:
                self._fetch(r)
                r.prefetched = True
                self._ahead_bytes += r.nbytes
                self.stats.prefetched_bytes += r.nbytes
            i -= 1
        self._cursor = i

    def _end_backward(self) -> None:
        for r in self._records:
            if r.device_raw is not None:  # prefetched and never used, or its last unpack never came
                self.mover.wait(r.event)
                r.device_raw = r.event = None
            self._release_host(r)
            r.prefetched = False
        self._in_backward, self._ahead_bytes, self._allowance = False, 0, 0

    def advance_prefetch(self, nbytes: int) -> None:
        """Called in backward as a later layer that keeps its activations (not offloaded, not recomputed) starts its
        backward, which frees about `nbytes`: prefetch room grows by that much, so the copies back run while those
        layers compute instead of when the offloaded layers are reached, without raising the backward's peak."""
        if not self._records:
            return
        if not self._in_backward:
            self._start_backward()
        self._allowance += nbytes
        self._prefetch_below(len(self._records))

    def moved_bytes(self) -> int:
        """Bytes this forward sent to the host."""
        return sum(r.nbytes for r in self._records)


class LayerOffload:
    """The context for one forward that offloads only inside the chosen decoder layers: a forward pre-hook enters
    the shared hooks and a forward hook leaves them (also when the layer raises). The module hooks exist only while
    this context is open, so a checkpointed layer's recompute in backward never offloads."""

    def __init__(self, hooks: OffloadActivations, layers, watch=()):
        self.hooks, self.layers, self.watch, self.handles = hooks, layers, watch, []

    def _watch_output(self, module, args, out):
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(self._on_grad)

    def _on_grad(self, grad):
        # a watched layer keeps about what an offloaded layer moved; its backward frees that much
        self.hooks.advance_prefetch(self.hooks.moved_bytes() // max(1, len(self.layers)))

    def __enter__(self):
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(lambda m, a: self.hooks.__enter__()))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: self.hooks.__exit__(None, None, None),
                                                            always_call=True))
        for layer in self.watch:  # later layers that keep their activations: their backward starts the copies back
            self.handles.append(layer.register_forward_hook(self._watch_output))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False


class ActivationOffloader:
    """What the trainer holds: `offloader()` is the context for one forward (nothing on CPU); stats add up.
    `layers`: offload only inside these modules (train.offload_layers), else the whole forward; `watch`: the other
    decoder layers that keep their activations (not recomputed), whose backward starts the copies back. With layers the forward never waits for a copy (no
    in-flight cap): the copies have the rest of the forward to finish."""

    def __init__(self, mover, layers=None, watch=(), **kw):
        self.mover, self.layers, self.watch, self.kw = mover, layers, watch, kw
        self.stats = OffloadStats()

    def limit_to(self, blocks: list, n: int) -> str:
        """train.offload_layers: offload only inside the first n decoder layers that do not recompute (their copies
        to the host have the rest of the forward to finish, and backward needs them last, so the copies back have
        the most time to land); the later layers that keep their activations start the copies back. Returns the line
        the run prints."""
        kept = [b for b in blocks if not getattr(b, "gradient_checkpointing", False)]
        self.layers = kept[:max(0, n)]
        self.watch = [b for b in kept if b not in self.layers]
        return f"offload: saved activations of {len(self.layers)} decoder layers go to pinned CPU memory"

    def __call__(self):
        if self.mover is None:
            return nullcontext()
        if self.layers is None:
            return OffloadActivations(self.mover, stats=self.stats, **self.kw)
        kw = {"max_inflight_bytes": 1 << 62, **self.kw}
        return LayerOffload(OffloadActivations(self.mover, stats=self.stats, **kw), self.layers, self.watch)


def activation_offloader(enabled: bool, device: torch.device, say=print) -> ActivationOffloader:
    """The trainer's offloader for `train.offload_activations`: a CUDA mover, or none (one line says why)."""
    if enabled and device.type != "cuda":
        say(f"train.offload_activations: needs CUDA; ignored on {device.type}")
    return ActivationOffloader(CudaMover(device) if enabled and device.type == "cuda" else None)
