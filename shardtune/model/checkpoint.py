"""Reading safetensors checkpoints without loading them: the files from_pretrained would read, every tensor's key,
dtype, shape and place from the headers alone, and row ranges copied out one chunk at a time."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from shardtune.errors import ModelError

SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


@dataclass
class CheckpointEntry:
    """One tensor of a safetensors checkpoint: where it is, its dtype and shape; read() copies rows out of the file."""

    key: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset in its file's data section (entries are read in file order)
    nbytes: int

    def read(self, start: Optional[int] = None, stop: Optional[int] = None, device=None, dtype=None) -> torch.Tensor:
        """Rows [start:stop] (all when None) as a fresh tensor on `device` in `dtype`.

        safetensors maps the file and returns views of the mapping; the mapping (and every page of it that was touched)
        stays resident while any view lives. Opening the file per read and copying out keeps the host's file-backed
        footprint to one chunk."""
        from safetensors import safe_open
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            if start is None or len(self.shape) == 0:
                view = f.get_tensor(self.key)
            else:
                view = f.get_slice(self.key)[start:stop]
            out = view.to(device=device or "cpu", dtype=dtype or view.dtype, copy=True)
            del view
        return out


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            return json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({e}); re-download the checkpoint") from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files from_pretrained would read: the index's shards, or model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{index} is unreadable ({e}); re-download the checkpoint") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{model_dir} is missing checkpoint shard(s) {', '.join(missing[:3])} named in "
                             f"{index.name}; finish the download")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ModelError(f"{model_dir} has only PyTorch .bin weights; streamed loading reads safetensors. Convert once "
                         "(load with transformers and save_pretrained(safe_serialization=True)) or use "
                         "parallel.strategy=none")
    raise ModelError(f"{model_dir} has no model.safetensors or model.safetensors.index.json; pass a Hugging Face "
                     "model directory with safetensors weights")


def list_checkpoint(model_dir: Path) -> list[CheckpointEntry]:
    """Every tensor of the checkpoint, from the file headers only (nothing is read), in file order."""
    entries = []
    for path in checkpoint_files(model_dir):
        for key, meta in _read_header(path).items():
            if key == "__metadata__":
                continue
            dt = SAFE_DTYPES.get(meta.get("dtype"))
            if dt is None:
                raise ModelError(f"{path.name}: tensor {key} has dtype {meta.get('dtype')}, which shardtune cannot "
                                 "load; use a bf16/fp16/fp32 checkpoint")
            b, e = meta["data_offsets"]
            entries.append(CheckpointEntry(key, path, dt, tuple(meta["shape"]), b, e - b))
    entries.sort(key=lambda t: (str(t.path), t.offset))
    return entries


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) one at a time, in file order, each a fresh CPU copy (the file mapping is released
    before the next). Keys are the checkpoint's own; see `CheckpointNames` for the model's names."""
    for e in list_checkpoint(model_dir):
        yield e.key, e.read()

