"""Peak host memory (RSS) and peak device memory over a stretch of code: the streamed loader reports with it, and
the load benchmark and the memory tests measure with it."""

from __future__ import annotations

import threading

import torch

def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux); then VmHWM is the exact peak since now."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryMonitor:
    """Peak host RSS from `start()` to `stop()` (or over a `with` block): the kernel's exact high-water mark when it
    can be reset, and psutil sampled every `interval_s` on a thread; peak device memory from the CUDA allocator.
    The streamed loader reports with it, and the load benchmark and memory tests measure with it."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self.peak_gpu = None
        self._stop = threading.Event()

    def start(self) -> "MemoryMonitor":
        self.baseline = _rss()
        self.hwm_ok = _reset_hwm()
        self.peak = self.baseline
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self):
        r = _rss()
        if r > self.peak:
            self.peak = r

    def stop(self) -> int:
        """Ends the sampling; returns the peak RSS in bytes."""
        self._stop.set()
        self._thread.join()
        self.sample()
        if self.hwm_ok:
            self.peak = max(self.peak, _hwm())
        self.peak_gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return self.peak

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
