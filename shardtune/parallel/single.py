"""One process, one device: plain autograd, optional fp16 loss scaling. Everything it needs is the base contract."""

from __future__ import annotations

from shardtune.parallel.base import Engine


class SingleEngine(Engine):
    name = "none"
    direct_forward = True  # no wrapper: the loop may call the decoder and the head itself (fused loss)
    state_format = "replicated"
