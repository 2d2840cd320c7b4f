"""Training state on disk without pickle: tensors in safetensors, everything else (optimizer hyper-parameters, LR
schedule, loss scale, scalars) in JSON. Shared by the engines whose state is plain or DTensor parameters (none, DDP,
FSDP2); DeepSpeed keeps its own format (parallel/safe_load.py).

Layout inside a checkpoint directory, one pair per writing rank (`replicated`: rank 0 only; `sharded`: every rank):
  state-rank00000.safetensors   param/<name>, optim/<name>/<key>   (this rank's local shard for DTensors)
  state-rank00000.json          world size, shapes, which tensors are sharded, param groups, scheduler, scaler
A sharded state written on N ranks loads on any M ranks: each tensor is rebuilt from the N pieces (FSDP2 shards
dim 0 in torch.chunk pieces) and this rank keeps its piece."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shardtune.errors import ShardtuneError

FORMAT = 1


class CheckpointError(ShardtuneError):
    """A checkpoint that cannot be read (damaged, from another version, or not matching the model)."""


def state_files(ckpt_dir: Path, rank: int) -> tuple[Path, Path]:
    return ckpt_dir / f"state-rank{rank:05d}.safetensors", ckpt_dir / f"state-rank{rank:05d}.json"


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if _is_dtensor(t) else t
    return t.detach().to("cpu").contiguous().clone()


def _json_value(v, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x, where) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x, where) for k, x in v.items()}
    raise CheckpointError(f"cannot store {where} ({type(v).__name__}) in a checkpoint without pickle")


def save_training_state(engine, ckpt_dir: Path) -> list[Path]:
    """Write this rank's share of trainable weights, optimizer state, schedule and scaler. Returns the files."""
    from safetensors.torch import save_file
    rank, world = engine.dist.rank, engine.dist.world_size
    sharded = engine.state_format == "sharded"
    if not sharded and rank != 0:
        return []
    named = engine.named_trainable()
    name_of = {id(p): n for n, p in named}
    opt = engine.optimizer
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "world_size": world, "rank": rank, "sharded_format": sharded,
            "params": {}, "optim": {}, "optim_scalars": {}}
    for n, p in named:
        tensors[f"param/{n}"] = _local(p)
        meta["params"][n] = {"shape": list(p.shape), "sharded": _is_dtensor(p)}
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"optim/{n}/{k}"] = _local(v)
                meta["optim"].setdefault(n, {})[k] = {"shape": list(v.shape), "sharded": _is_dtensor(v)}
            else:
                meta["optim_scalars"].setdefault(n, {})[k] = _json_value(v, f"optimizer state {n}.{k}")
    meta["param_groups"] = [
        {**{k: _json_value(v, f"param group {k}") for k, v in g.items() if k != "params"},
         "params": [name_of[id(p)] for p in g["params"]]} for g in opt.param_groups]
    meta["scheduler"] = _json_value(engine.scheduler.state_dict(), "LR schedule")
    meta["scaler"] = _json_value(engine.scaler.state_dict(), "loss scaler") if engine.scaler else None
    st, js = state_files(ckpt_dir, rank)
    save_file(tensors, str(st))
    js.write_text(json.dumps(meta))
    return [st, js]


class _Pieces:
    """Reads one tensor of a sharded state: this rank's own piece when the rank count is unchanged, else the
    whole tensor rebuilt from every rank's piece."""

    def __init__(self, ckpt_dir: Path, saved_world: int, rank: int, world: int):
        from safetensors import safe_open
        self.same = saved_world == world
        ranks = [rank] if self.same else range(saved_world)
        self.files = []
        for r in ranks:
            st, _ = state_files(ckpt_dir, r)
            if not st.is_file():
                raise CheckpointError(f"{st.name} is missing from {ckpt_dir}")
            self.files.append(safe_open(str(st), framework="pt"))

    def get(self, key: str, sharded: bool) -> tuple[torch.Tensor, bool]:
        """(tensor, is_local_piece)."""
        if self.same or not sharded:
            return self.files[0].get_tensor(key), self.same and sharded
        return torch.cat([f.get_tensor(key) for f in self.files], dim=0), False


def _fill(target: torch.Tensor, value: torch.Tensor, is_piece: bool) -> None:
    """Copy a saved tensor into a (possibly DTensor) target: a local piece straight into the local shard, a full
    tensor through FSDP2's dim-0 chunking."""
    with torch.no_grad():
        if _is_dtensor(target):
            if is_piece:
                local = target.to_local()
                local.copy_(value.reshape(local.shape))
            else:
                from shardtune.parallel.fsdp import copy_full_into
                copy_full_into(target, value)
        else:
            target.copy_(value.reshape(target.shape))


def load_training_state(engine, ckpt_dir: Path) -> None:
    from safetensors import SafetensorError
    rank, world = engine.dist.rank, engine.dist.world_size
    _, js0 = state_files(ckpt_dir, 0)
    if not js0.is_file():
        raise CheckpointError(f"{ckpt_dir} holds no {js0.name}")
    meta = json.loads(js0.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir} has state format {meta.get('format')}, this shardtune reads {FORMAT}")
    sharded = bool(meta["sharded_format"])
    saved_world = int(meta["world_size"]) if sharded else 1
    if sharded and saved_world == world and rank:
        meta = json.loads(state_files(ckpt_dir, rank)[1].read_text())
    named = engine.named_trainable()
    missing = sorted(set(n for n, _ in named) - set(meta["params"]))
    extra = sorted(set(meta["params"]) - set(n for n, _ in named))
    if missing or extra:
        raise CheckpointError(f"{ckpt_dir} does not match this model's trainable parameters "
                              f"({len(missing)} missing, {len(extra)} unexpected, e.g. {(missing or extra)[0]})")
    try:
        pieces = _Pieces(ckpt_dir, saved_world, rank, world)
        for n, p in named:
            if list(p.shape) != meta["params"][n]["shape"]:
                raise CheckpointError(f"{ckpt_dir}: {n} has shape {meta['params'][n]['shape']}, the model "
                                      f"{list(p.shape)}")
            _fill(p, *pieces.get(f"param/{n}", meta["params"][n]["sharded"]))
        index = {n: i for i, (n, _) in enumerate(named)}
        state = {}
        for n, p in named:
            entry = dict(meta["optim_scalars"].get(n, {}))
            for k, info in meta["optim"].get(n, {}).items():
                value, is_piece = pieces.get(f"optim/{n}/{k}", info["sharded"])
                if info["sharded"] and _is_dtensor(p):
                    target = torch.zeros_like(p, dtype=value.dtype)
                    _fill(target, value, is_piece)
                    value = target
                entry[k] = value
            if entry:
                state[index[n]] = entry
    except SafetensorError as e:
        raise CheckpointError(f"{ckpt_dir} is damaged ({e})") from None
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    engine.optimizer.load_state_dict({"state": state, "param_groups": groups})
    engine.scheduler.load_state_dict(meta["scheduler"])
    if engine.scaler is not None and meta.get("scaler"):
        engine.scaler.load_state_dict(meta["scaler"])
