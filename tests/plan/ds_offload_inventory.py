"""What DeepSpeed keeps in CPU memory when it offloads the optimizer: one process, CPU accelerator, a tiny Llama
trained one step under ZeRO-2 or ZeRO-3 with `offload_optimizer: cpu`; prints JSON with the bytes of every CPU
tensor its ZeRO optimizer holds, by attribute. On a GPU machine the model's own bf16 weights and DeepSpeed's GPU-side
gradient buffer live on the device: those attributes are left out (GPU_SIDE). Run by tests/plan/test_plan_cpu_ram.py
as `python ds_offload_inventory.py STAGE PORT`."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

CONFIG = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
GPU_SIDE = {"bit16_groups", "temp_grad_buffer_for_gpu_offload", "persistent_parameters", "_global_grad_norm",
            "inf_or_nan_tracker"}


def main(stage: int, port: int) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
              "zero_force_ds_cpu_optimizer": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=ds_cfg, dist_init_required=False)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()

    seen: set[int] = set()

    def storage_bytes(obj, depth=0) -> int:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                return 0
            st = obj.untyped_storage()
            own = 0 if st.data_ptr() in seen else st.nbytes()
            seen.add(st.data_ptr())
            return own + (storage_bytes(obj.grad) if obj.grad is not None else 0)
        if depth > 4:
            return 0
        if isinstance(obj, (list, tuple)):
            return sum(storage_bytes(x, depth + 1) for x in obj)
        if isinstance(obj, dict):
            return sum(storage_bytes(x, depth + 1) for x in obj.values())
        return 0

    zero = engine.optimizer
    for name in GPU_SIDE:   # mark them seen first: they must not be counted under another attribute either
        storage_bytes(getattr(zero, name, None))
    out = {name: b for name, val in vars(zero).items() if name not in GPU_SIDE and (b := storage_bytes(val))}
    out["optimizer states (AdamW)"] = storage_bytes(zero.optimizer.state)
    return {"stage": stage, "params": params, "largest": largest, "cpu_bytes": out}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
