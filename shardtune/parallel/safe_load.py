"""DeepSpeed's checkpoint files are torch pickles. They are read here with `torch.load(weights_only=True)` and an
explicit allow-list of the few DeepSpeed and Python classes its state holds, so a crafted file cannot run code:
anything outside the list is refused before it is built."""

from __future__ import annotations

import collections

import torch

from shardtune.errors import ShardtuneError


class UnsafeCheckpoint(ShardtuneError):
    pass


def _allowed_globals() -> list:
    allowed = [collections.OrderedDict, collections.defaultdict, set, frozenset, slice]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.base_optimizer import ZeROOptimizer  # noqa: F401
    except ImportError:
        pass
    return allowed


def safe_torch_load(path: str, map_location=None):
    import pickle
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpoint(f"{path} holds objects outside the checkpoint allow-list and was not loaded "
                                   f"({first[:160]}); delete that checkpoint or set train.resume=false") from None


class SafeTorchCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: saving and committing unchanged, loading through `safe_torch_load`."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)
