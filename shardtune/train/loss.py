"""Next-token loss as a sum over labelled positions, two ways.

`logits_loss_sum` runs the model's own forward (full logits, upcast to fp32): works under every engine and wrapper.
`fused_loss_sum` runs the decoder, keeps only the hidden states of labelled positions (prompt tokens masked out of
an SFT sample never reach the vocabulary projection), and projects + scores them in chunks: with Liger's fused
linear cross-entropy on CUDA, else chunk by chunk with recomputation, so the [tokens x vocab] fp32 logits (5 GB for
4096 tokens of a 128k vocabulary) never exist at once. It calls submodules directly, so it is only used where no
wrapper's forward hooks must run (the one-process engine).

`head_fused_loss_sum` gives the same result under any wrapper (DDP, FSDP2, DeepSpeed ZeRO-3): for one call it swaps
the output layer's forward for one that scores the labelled positions and returns the loss sum in place of the
logits. The model's own forward runs, so every engine hook fires as usual (the layer's weight is gathered around
its forward and its backward as always).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from shardtune.resolve import FUSABLE_HEAD_TYPES as PLAIN_HEAD_TYPES  # one list, shared with the planner


def logits_loss_sum(model, batch: dict, dtype: torch.dtype, device) -> torch.Tensor:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(**inputs).logits
    shift = logits[:, :-1, :].float()
    return F.cross_entropy(shift.reshape(-1, shift.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def _base(model):
    """The transformers model under any wrapper: DDP / DeepSpeed (.module), then peft (get_base_model)."""
    while not hasattr(model, "get_base_model") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_fuse(model) -> bool:
    base = _base(model)
    cfg = getattr(base, "config", None)
    return (cfg is not None and cfg.model_type in PLAIN_HEAD_TYPES and hasattr(base, "model")
            and base.get_output_embeddings() is not None and not getattr(cfg, "final_logit_softcapping", None))


def _chunk_ce(project, h, y):
    return F.cross_entropy(project(h).float(), y, reduction="sum")


def _labelled(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over the flattened shifted positions that carry a label, those labels)."""
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    return keep, target[keep]


def _score(h: torch.Tensor, y: torch.Tensor, head, project, use_liger: bool, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of the labelled hidden states `h` against `y` through the output layer: Liger's fused
    linear cross-entropy when asked and the head is a plain linear layer, else `project` chunk by chunk with
    recomputation in backward (one chunk's logits alive at a time)."""
    if _liger_head(head, use_liger):
        w = head.weight
        return _liger_flce()(reduction="sum")(w, h.to(w.dtype), y, head.bias).float()
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.size(0), chunk_tokens):
        hs, ys = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, project, hs, ys, use_reentrant=False)
        else:
            total = total + _chunk_ce(project, hs, ys)
    return total


def _want_liger(use_liger: bool | None, device) -> bool:
    return device.type == "cuda" and _liger_flce() is not None if use_liger is None else use_liger


def _liger_head(head, use_liger: bool) -> bool:
    return bool(use_liger) and isinstance(head, torch.nn.Linear) and getattr(head, "weight", None) is not None


def fused_loss_sum(model, batch: dict, dtype: torch.dtype, device, chunk_tokens: int = 2048,
                   use_liger: bool | None = None) -> torch.Tensor:
    base = _base(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep, y = _labelled(batch["labels"])
    head = base.get_output_embeddings()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        hidden = base.model(**inputs).last_hidden_state
    h = hidden[:, :-1, :].reshape(-1, hidden.size(-1))[keep]
    liger = _liger_head(head, _want_liger(use_liger, device))
    # Liger's kernel takes the weight's dtype itself; the chunked projection runs under autocast like the model
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not liger):
        return _score(h, y, head, head, liger, chunk_tokens)


def head_fused_loss_sum(model, batch: dict, dtype: torch.dtype, device, chunk_tokens: int = 2048,
                        use_liger: bool | None = None) -> torch.Tensor:
    base = _base(model)
    head = base.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep, y = _labelled(batch["labels"])
    liger = _want_liger(use_liger, device)
    project = head.forward  # the layer's own computation (LoRA or modules_to_save wrappers included)

    def scored_forward(hidden):
        h = hidden[:, :-1, :].reshape(-1, hidden.size(-1))[keep]
        # a fresh tensor, not a view: FSDP2 hooks the output layer's result for its backward, and warns that an
        # in-place op on a returned view would drop that hook
        return _score(h, y, head, project, liger, chunk_tokens).reshape(1, 1, 1).clone()

    head.forward = scored_forward
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            result = model(**inputs)
    finally:
        del head.forward  # back to the class's forward
    return result.logits.reshape(())


def _liger_flce():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
