"""Packing and batching: a packed row must compute exactly what its samples compute on their own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from data_helpers import data_cfg, write_jsonl

from shardtune.data.pipeline import build_datasets, collate, count_target_tokens, pack


def sample(ids, n_prompt):
    labels = [-100] * n_prompt + list(ids[n_prompt:])
    return {"input_ids": list(ids), "labels": labels}


def test_collate_pads_right_and_masks():
    a, b = sample([5, 6, 7, 8, 9], 2), sample([11, 12, 13], 1)
    batch = collate([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 12, 13, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert count_target_tokens(batch) == 3 + 2
    assert collate([a, b], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    assert collate([b], pad_id=None)["input_ids"].tolist() == [[11, 12, 13]]  # no pad token: nothing to pad here


def test_count_target_tokens_ignores_the_first_position():
    batch = {"labels": torch.tensor([[4, 5, -100, 6], [7, -100, -100, -100]])}
    assert count_target_tokens(batch) == 2  # after the shift only columns 1.. count


def test_pack_fills_rows_and_restarts_positions():
    samples = [sample(list(range(10 * k + 1, 10 * k + 1 + n)), 1) for k, n in enumerate([5, 4, 6, 3, 7])]
    rows = pack(samples, 10)
    assert [len(r["input_ids"]) for r in rows] == [9, 9, 7]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert sum((r["input_ids"] for r in rows), []) == sum((s["input_ids"] for s in samples), [])
    assert sum((r["labels"] for r in rows), []) == sum((s["labels"] for s in samples), [])
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]  # padding is its own block
    assert batch["labels"][2, 7:].tolist() == [-100, -100]
    with pytest.raises(ValueError, match="mix"):
        collate([rows[0], samples[0]], 0)


def test_packing_in_build_datasets(tmp_path, tok):
    recs = [{"instruction": f"What is two plus {i}?", "output": f"The answer is {i + 2}."} for i in range(30)]
    p = write_jsonl(tmp_path / "d.jsonl", recs)
    plain = build_datasets(data_cfg(p, max_seq_len=128), tok, 3)
    packed = build_datasets(data_cfg(p, max_seq_len=128, packing=True), tok, 3)
    assert len(packed.train) < len(plain.train)
    assert all(len(r["input_ids"]) <= 128 for r in packed.train)
    # same tokens and targets, only regrouped
    assert sum(len(r["input_ids"]) for r in packed.train) == sum(len(s["input_ids"]) for s in plain.train)
    assert count_target_tokens(collate(packed.train, 0)) == count_target_tokens(collate(plain.train, 0))
    assert packed.stats["train_rows"] == len(packed.train)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_separate_samples(tiny_model, attn):
    """transformers builds a block-diagonal causal mask from position_ids when no attention_mask is given and no KV
    cache is in use (shardtune's loader sets config.use_cache=False); the logits must match separate runs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    g = torch.Generator().manual_seed(0)
    a = sample(torch.randint(5, 200, (13,), generator=g).tolist(), 4)
    b = sample(torch.randint(5, 200, (9,), generator=g).tolist(), 3)
    c = sample(torch.randint(5, 200, (6,), generator=g).tolist(), 2)
    rows = pack([a, b, c], 24) + pack([c], 24)          # a+b in one row, c alone (padded) in the other
    assert len(rows) == 3 and rows[0]["position_ids"][13] == 0
    rows = [rows[0], rows[2]]
    batch = collate(rows, pad_id=0, pad_to_multiple_of=8)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        sep = [model(input_ids=torch.tensor([s["input_ids"]])).logits[0] for s in (a, b, c)]
    torch.testing.assert_close(packed[0, :13], sep[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 13:22], sep[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :6], sep[2], atol=1e-5, rtol=1e-5)

    # and the summed token loss is the same as the three samples' losses added up
    def loss_sum(logits, labels):
        return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")

    packed_loss = sum(loss_sum(packed[i], batch["labels"][i]) for i in range(2))
    sep_loss = sum(loss_sum(lg, torch.tensor(s["labels"])) for lg, s in zip(sep, (a, b, c)))
    torch.testing.assert_close(packed_loss, sep_loss, atol=1e-4, rtol=1e-5)
    assert count_target_tokens(batch) == sum(count_target_tokens(collate([s], 0)) for s in (a, b, c))


def test_packed_row_through_shardtune_model_loader(tiny_model):
    """The same equivalence on the model the training loop gets (shardtune's loader + LoRA), called the way the
    loop calls it: model(**batch) without labels. Guards the loader's use_cache=False, which packing relies on."""
    from shardtune.config import RunConfig
    from shardtune.model.load import build_model

    cfg = RunConfig()
    cfg.model.name_or_path = str(tiny_model("llama"))
    cfg.train.method = "lora"
    model = build_model(cfg, tiny_model("llama"), torch.device("cpu"), torch.float32).eval()
    a, b = sample(list(range(20, 31)), 3), sample(list(range(40, 47)), 2)
    batch = collate(pack([a, b], 32), pad_id=0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        sep = torch.cat([model(**{k: v for k, v in collate([s], 0).items() if k != "labels"}).logits[0]
                         for s in (a, b)])
    torch.testing.assert_close(packed, sep, atol=1e-5, rtol=1e-5)
