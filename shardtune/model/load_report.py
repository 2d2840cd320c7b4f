"""What loading cost on one rank (bytes read, seconds, host and device memory peaks, bytes kept), and every rank's
report gathered for printing on rank 0."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

@dataclass
class LoadReport:
    """What loading cost on one rank: bytes read from the checkpoint, time, host and device memory peaks, and the
    bytes of weights (+ quantization constants) the rank keeps."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    tensors: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    rss_start_bytes: int = 0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: Optional[int] = None
    kept_bytes: int = 0
    skipped_keys: list[str] = field(default_factory=list)

    @property
    def rss_growth_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.rss_start_bytes)

    def format(self) -> str:
        gb = 1e9
        mbps = self.bytes_read / max(self.seconds, 1e-9) / 1e6
        gpu = f", GPU peak {self.peak_gpu_bytes / gb:.2f} GB" if self.peak_gpu_bytes is not None else ""
        return (f"load rank {self.rank}/{self.world_size}: {self.tensors} tensors, {self.bytes_read / gb:.2f} GB read "
                f"in {self.seconds:.1f} s ({mbps:.0f} MB/s), peak CPU RSS {self.peak_rss_bytes / gb:.2f} GB "
                f"(+{self.rss_growth_bytes / gb:.2f} GB){gpu}, kept {self.kept_bytes / gb:.3f} GB on {self.device}")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rss_growth_bytes"] = self.rss_growth_bytes
        d["skipped_keys"] = list(self.skipped_keys)[:20]
        return d


def gather_load_reports(report: LoadReport) -> list[LoadReport]:
    """Every rank's report (collective when torch.distributed is initialised; call it on all ranks)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [report]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, report.to_dict())
    reps = []
    for d in out:
        d = dict(d)
        d.pop("rss_growth_bytes", None)
        reps.append(LoadReport(**d))
    return reps
