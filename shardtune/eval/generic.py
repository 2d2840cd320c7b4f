"""Scores for data whose answers are not SQL: eval loss and perplexity over the tokens training scores, and
whitespace-normalized exact match of the generations."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from shardtune.eval.records import EvalRecord
from shardtune.export.generate import PromptStyle, render_example_ids


def _normalize_text(s: str) -> str:
    return " ".join(s.split())


def eval_loss(model, tokenizer, records: Sequence[EvalRecord], style: PromptStyle,
              batch_size: int = 8, max_len: Optional[int] = None) -> tuple[float, int]:
    """Mean next-token loss over the tokens training scores: each response and the EOS after it (for raw-text
    records, every token after the first), per token over the whole file."""
    import torch
    import torch.nn.functional as F

    device = next(p.device for p in model.parameters())
    examples = []
    for r in records:
        if r.is_text:
            ids, n_prompt = render_example_ids("", r.gold, tokenizer, PromptStyle(None, "none", style.bos_id))
        else:
            ids, n_prompt = render_example_ids(r.messages, r.gold, tokenizer, style)
        if max_len:
            ids = ids[:max_len]
        labels = [-100] * min(max(n_prompt, 1), len(ids)) + ids[max(n_prompt, 1):]
        if any(t != -100 for t in labels):
            examples.append((ids, labels))
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            lab = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (x, y) in enumerate(chunk):
                ids[i, :len(x)], lab[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift = logits[:, :-1]
            target = lab[:, 1:].to(device)
            total += F.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1), ignore_index=-100,
                                     reduction="sum").item()
            count += int((target != -100).sum())
    return (total / count if count else float("nan")), count


def score_generic(records: Sequence[EvalRecord], preds: Sequence[str], model, tokenizer, style: PromptStyle,
                  batch_size: int = 8, max_len: Optional[int] = None) -> tuple[dict, list[dict]]:
    """Summary and one row per record. Raw-text records are scored by loss only (their `exact` is None)."""
    rows = []
    for r, p in zip(records, preds):
        exact = None if r.is_text else _normalize_text(p) == _normalize_text(r.gold)
        rows.append({"index": r.index, "where": r.where, "prompt": r.prompt[-300:],
                     "gold": r.gold[:300] if r.is_text else r.gold, "pred": p, "exact": exact,
                     "status": None if exact is None else ("match" if exact else "mismatch")})
    asked = [x for x in rows if x["exact"] is not None]
    summary = {"metric": "generic", "n": len(rows),
               "exact_match": sum(x["exact"] for x in asked) / len(asked) if asked else None}
    loss, n_tok = eval_loss(model, tokenizer, records, style, batch_size=batch_size, max_len=max_len)
    summary.update(eval_loss=loss, perplexity=math.exp(loss) if loss == loss and loss < 50 else None,
                   loss_tokens=n_tok)
    return summary, rows
