"""Fast single-process checks of the pieces behind sharded training: the DeepSpeed config builder ("auto" filling and
conflicts), launch helpers, the shardable 4-bit linear layer against bitsandbytes' own, and the balance arithmetic."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from shardtune.config import load_config
from shardtune.errors import ConfigError, ImbalanceError
from shardtune.parallel.dsconfig import build_ds_config, describe_filled


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _write(tmp_path, data) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(data))
    return str(p)


# ------------------------------------------------------------------------------------------------ dsconfig

def test_generated_config_follows_shardtune_config():
    cfg = _cfg("train.micro_batch_size=3", "train.grad_accum=5", "parallel.zero_stage=3",
               "parallel.offload_optimizer=true", "parallel.offload_param=true", "train.grad_clip=0.7")
    ds, filled = build_ds_config(cfg, 4, compute_dtype=torch.bfloat16, hidden_size=64, min_quant_numel=300)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.7
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    # torch AdamW is passed by shardtune, so DeepSpeed must not insist on its compiled CPU Adam
    assert ds["zero_force_ds_cpu_optimizer"] is False
    # the persistence threshold stays below the smallest packed 4-bit weight (else it would be replicated)
    assert z["stage3_param_persistence_threshold"] == 299
    assert z["reduce_bucket_size"] == 64 * 64
    assert filled == []


def test_auto_values_are_filled_and_reported(tmp_path):
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                      "eps": "auto"}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                              "warmup_num_steps": "auto", "total_num_steps": "auto"}},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto",
                                  "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    path = _write(tmp_path, user)
    before = (tmp_path / "ds.json").read_text()
    cfg = _cfg(f"parallel.deepspeed_config={path}", "parallel.strategy=deepspeed", "train.micro_batch_size=2",
               "train.grad_accum=3", "train.lr=5e-4", "train.warmup_steps=7")
    ds, filled = build_ds_config(cfg, 2, compute_dtype=torch.float16, hidden_size=32, total_steps=40)
    assert (tmp_path / "ds.json").read_text() == before  # the user's file is never rewritten
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {"lr": 5e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                                         "torch_adam": True}
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-4, "warmup_num_steps": 7,
                                         "total_num_steps": 40}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert ds["zero_optimization"]["stage"] == 2  # the JSON's stage wins over the default parallel.zero_stage
    line = describe_filled(filled, path)
    assert line.count("\n") == 0 and path in line
    for piece in ("train_micro_batch_size_per_gpu=2", "fp16.enabled=true", "optimizer.params.lr=0.0005",
                  "scheduler.params.total_num_steps=40", "zero_optimization.reduce_bucket_size=1024"):
        assert piece in line, piece


BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("user, overrides, dtype, needles", [
    ({"fp16": {"enabled": True}}, [], BF16, ["fp16.enabled=true", "train.precision", "bfloat16"]),
    ({"bf16": {"enabled": False}}, [], BF16, ["bf16.enabled=false", "train.precision"]),
    ({"bf16": {"enabled": True}}, [], FP32, ["bf16.enabled=true", "float32"]),
    ({"train_micro_batch_size_per_gpu": 16}, ["train.micro_batch_size=4"], FP32,
     ["train_micro_batch_size_per_gpu=16", "train.micro_batch_size=4"]),
    ({"gradient_accumulation_steps": 4}, ["train.grad_accum=1"], FP32, ["gradient_accumulation_steps=4", "train.grad_accum=1"]),
    ({"train_batch_size": 999}, [], FP32, ["train_batch_size=999", "train.micro_batch_size x train.grad_accum"]),
    ({"zero_optimization": {"stage": 3}}, ["parallel.zero_stage=2"], FP32,
     ["zero_optimization.stage=3", "parallel.zero_stage=2"]),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, [], FP32,
     ["parameter offload", "stage 2"]),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}}, ["parallel.offload_optimizer=true"],
     FP32, ["offload_optimizer.device='none'", "parallel.offload_optimizer=true"]),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, [], FP32,
     ["zero_optimization.sub_group_size=\"auto\"", "no value"]),
    ({"gradient_clipping": 2.0}, ["train.grad_clip=0.5"], FP32, ["gradient_clipping=2.0", "train.grad_clip=0.5"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, ["train.optimizer=adamw_8bit"], FP32,
     ["optimizer", "train.optimizer=adamw_8bit"]),
    ({"zero_force_ds_cpu_optimizer": True, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     [], FP32, ["zero_force_ds_cpu_optimizer=true", "optimizer"]),
])
def test_conflicts_name_both_sides(tmp_path, user, overrides, dtype, needles):
    path = _write(tmp_path, user)
    cfg = _cfg(f"parallel.deepspeed_config={path}", *overrides)
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, 2, compute_dtype=dtype, hidden_size=16)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_json_values_win_over_shardtune_defaults(tmp_path):
    path = _write(tmp_path, {"gradient_clipping": 0.25, "zero_optimization": {"stage": 2}})
    ds, filled = build_ds_config(_cfg(f"parallel.deepspeed_config={path}"), 2, compute_dtype=torch.float32)
    assert ds["gradient_clipping"] == 0.25 and ds["zero_optimization"]["stage"] == 2 and filled == []


@pytest.mark.parametrize("content, needle", [(None, "not found"), ("{bad", "not valid JSON"), ("[1]", "JSON object")])
def test_unreadable_json_is_a_config_error(tmp_path, content, needle):
    p = tmp_path / "x.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        build_ds_config(_cfg(f"parallel.deepspeed_config={p}"), 2)


def test_example_json_in_repo_is_accepted():
    from pathlib import Path
    ex = Path(__file__).resolve().parents[2] / "examples" / "ds_zero3_offload.json"
    cfg = _cfg(f"parallel.deepspeed_config={ex}", "train.micro_batch_size=2", "train.grad_accum=4")
    ds, filled = build_ds_config(cfg, 8, compute_dtype=torch.bfloat16, hidden_size=4096, total_steps=100,
                                 min_quant_numel=2_000_000)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 64 and ds["bf16"]["enabled"]
    assert "train_micro_batch_size_per_gpu=2" in filled


# ------------------------------------------------------------------------------------------------ launch

def test_launcher_detection():
    from shardtune.parallel.launch import detect_launcher
    assert detect_launcher({}) is None
    assert detect_launcher({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2", "CROSS_RANK": "0"}) == "deepspeed"
    assert detect_launcher({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}) == "slurm"
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize("nodes, first", [("gpu[03-05,07]", "gpu03"), ("node7", "node7"), ("a[1,2],b3", "a1"),
                                          ("x-[10-11]", "x-10")])
def test_first_slurm_host(nodes, first):
    from shardtune.parallel.launch import _first_slurm_host
    assert _first_slurm_host(nodes) == first


def test_slurm_env_feeds_torch_rendezvous():
    from shardtune.parallel import launch
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[12-13]",
           "SLURM_JOB_ID": "4242"}
    launch._env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu12" and env["MASTER_PORT"] == str(20000 + 4242)
    env2 = {**env, "MASTER_ADDR": "head", "MASTER_PORT": "1"}
    launch._env_from_slurm(env2)  # what the user exported wins
    assert env2["MASTER_ADDR"] == "head" and env2["MASTER_PORT"] == "1"


def test_relaunch_hands_the_node_layout_to_the_supervisor(monkeypatch):
    from shardtune.parallel import launch, supervise
    seen = {}
    monkeypatch.setattr(supervise, "supervise", lambda argv, *a, **kw: seen.update(argv=argv, a=a) or 7)
    monkeypatch.setattr(launch, "_visible_gpus", lambda: 8)
    rc = launch.relaunch(["cfg.yaml", "lora.rank=4", "--nproc", "2"], nproc=2, nnodes=2, node_rank=1,
                         master_addr="10.0.0.1", master_port=1234)
    assert rc == 7
    assert seen["argv"] == ["cfg.yaml", "lora.rank=4"]
    assert seen["a"][:5] == (2, 2, 1, "10.0.0.1", 1234)
    with pytest.raises(ConfigError, match="node-rank"):
        launch.relaunch([], nproc=2, nnodes=2, node_rank=2)
    launch.relaunch(["x=1"], nproc=2)  # one node, default address: a free port, not the default one
    assert seen["a"][3] == "127.0.0.1" and seen["a"][4] != 29500
    launch.relaunch(["x=1"], nproc=2, master_port=4321)
    assert seen["a"][4] == 4321
    monkeypatch.setattr(launch, "_visible_gpus", lambda: 0)
    with pytest.raises(ConfigError, match="CPU machine"):
        launch.relaunch(["x=1"], nproc=(os.cpu_count() or 1) + 1)


# ------------------------------------------------------------------------------------------------ quant4

def _linear4bit(storage, nested, out_f=48, in_f=80, seed=0):
    import bitsandbytes as bnb
    torch.manual_seed(seed)
    m = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, compress_statistics=nested,
                          quant_type="nf4", quant_storage=storage)
    w = torch.randn(out_f, in_f) * 0.05
    m.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type="nf4",
                                 quant_storage=storage, module=m)
    with torch.no_grad():
        m.bias.copy_(torch.randn(out_f) * 0.1)
    m.bias.requires_grad_(False)
    return m.to("cpu")


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("nested", [True, False])
def test_shardable_linear_matches_bitsandbytes(storage, nested):
    import copy

    from shardtune.parallel.quant4 import ShardedLinear4bit, convert_linear4bit
    ref = _linear4bit(storage, nested)
    m = convert_linear4bit(copy.deepcopy(ref))
    assert isinstance(m, ShardedLinear4bit) and type(m.weight) is torch.nn.Parameter
    assert m.weight.dtype == m.quant_blob.dtype == storage
    assert m.quant_blob.numel() == m.layout.blob_numel and m.weight.shape == (m.layout.packed_rows, 1)
    x1 = torch.randn(3, 5, 80, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ref(x1), m(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    torch.testing.assert_close(m.dequantized_weight(),
                               __import__("bitsandbytes").functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state))


def test_layout_on_meta_matches_real_quantization():
    import bitsandbytes as bnb

    from shardtune.parallel.quant4 import convert_linear4bit, quantize_into
    for storage in (torch.float32, torch.bfloat16, torch.uint8):
        for nested in (True, False):
            real = convert_linear4bit(_linear4bit(storage, nested, out_f=96, in_f=200))
            with torch.device("meta"):
                meta = bnb.nn.Linear4bit(200, 96, bias=False, compute_dtype=torch.float32,
                                         compress_statistics=nested, quant_type="nf4", quant_storage=storage)
            meta = convert_linear4bit(meta, weight_dtype=torch.float32)
            assert meta.weight.is_meta and meta.quant_blob.is_meta
            assert meta.weight.shape == real.weight.shape and meta.quant_blob.shape == real.quant_blob.shape
            # a loader fills a meta-built layer by quantizing the full weight with the layer's settings
            w = torch.randn(96, 200)
            packed, blob = quantize_into(meta, w)
            assert packed.shape == meta.weight.shape and blob.shape == meta.quant_blob.shape
            ref_packed, ref_qs = bnb.functional.quantize_4bit(w, compress_statistics=nested, quant_type="nf4",
                                                              quant_storage=storage)
            assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))


def test_quant_constants_are_a_few_percent_of_packed_bytes():
    """Documented figure: with double quant the per-layer constants are ~1/32 of the packed 4-bit bytes."""
    from shardtune.parallel.quant4 import QuantLayout
    lay = QuantLayout(4096, 4096, 64, "nf4", True, torch.bfloat16, torch.bfloat16)
    ratio = lay.blob_bytes / (lay.packed_rows * 2)
    assert 0.031 < ratio < 0.032  # 1/32 (uint8 absmax per 64 values) + fp32 nested absmax per 256 blocks
    plain = QuantLayout(4096, 4096, 64, "nf4", False, torch.bfloat16, torch.bfloat16)
    assert 0.12 < plain.blob_bytes / (plain.packed_rows * 2) < 0.13


def test_fsdp_guard_refuses_a_storage_dtype_it_would_cast():
    from shardtune.parallel.fsdp import mixed_precision_policy
    from shardtune.parallel.quant4 import check_quant_storage, convert_linear4bit
    model = torch.nn.Sequential(convert_linear4bit(_linear4bit(torch.float32, True)))
    with pytest.raises(ConfigError, match="stored as float32 but FSDP casts parameters to bfloat16"):
        check_quant_storage(model, mixed_precision_policy(torch.bfloat16).param_dtype, "FSDP")
    check_quant_storage(model, mixed_precision_policy(torch.float32).param_dtype, "FSDP")  # no cast, no error
    ok = torch.nn.Sequential(convert_linear4bit(_linear4bit(torch.uint8, True)))
    check_quant_storage(ok, mixed_precision_policy(torch.bfloat16).param_dtype, "FSDP")  # integer storage: no cast


def test_deepspeed_guard_refuses_a_storage_dtype_it_would_cast():
    from shardtune.parallel.dsconfig import cast_dtype
    from shardtune.parallel.quant4 import check_quant_storage
    model = torch.nn.Sequential(_linear4bit(torch.float32, True))
    with pytest.raises(ConfigError, match="stored as float32 but DeepSpeed casts parameters to bfloat16"):
        check_quant_storage(model, cast_dtype({"bf16": {"enabled": True}}), "DeepSpeed")
    check_quant_storage(model, cast_dtype({"bf16": {"enabled": False}}), "DeepSpeed")


# ------------------------------------------------------------------------------------------------ balance

def test_outliers():
    from shardtune.parallel.balance import outliers
    assert outliers([100, 100, 100, 100], 0.15) == []
    assert outliers([400, 3, 3, 3], 0.15) == [0, 1, 2, 3]  # the seeds' failure: rank 0 holds everything
    assert outliers([100, 100, 100, 130], 0.15) == [3]
    assert outliers([100, 100, 100, 130], 0.15, floor=1000) == []


def test_check_balance_single_rank_prints_and_passes():
    from types import SimpleNamespace

    from shardtune.parallel.balance import check_balance
    from shardtune.parallel.base import DistInfo
    eng = SimpleNamespace(dist=DistInfo(), device=torch.device("cpu"), name="none", local_param_bytes=lambda: 2**20)
    lines = []
    stats = check_balance(eng, 0.15, out=lines.append)
    assert stats[0][0] == 2**20 and len(lines) == 1 and lines[0].startswith("rank 0: parameters 1.00 MiB")
    assert ImbalanceError.__doc__


def test_unpack_handles_a_blob_at_an_odd_offset():
    """DeepSpeed may hand back a gathered 2-byte-storage blob that starts 2 bytes into a 4-byte word."""
    from shardtune.parallel.quant4 import convert_linear4bit
    m = convert_linear4bit(_linear4bit(torch.bfloat16, True))
    blob = m.quant_blob.detach()
    shifted = torch.cat([torch.zeros(1, dtype=blob.dtype), blob])[1:]
    assert shifted.view(torch.uint8).storage_offset() % 4 == 2
    a, b = m.layout.unpack(blob, m._codes["cpu"]), m.layout.unpack(shifted, m._codes["cpu"])
    assert torch.equal(a.absmax, b.absmax) and torch.equal(a.state2.absmax, b.state2.absmax)
    assert float(a.offset) == float(b.offset)
    w = m.weight.detach()
    assert torch.equal(m.layout.dequantize(w, blob, m._codes["cpu"]), m.layout.dequantize(w, shifted, m._codes["cpu"]))


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_a_deepspeed_json_under_another_engine_is_refused(engine, tmp_path):
    from shardtune.parallel.base import DistInfo
    from shardtune.parallel.ddp import DDPEngine
    from shardtune.parallel.fsdp import FSDPEngine
    cls = FSDPEngine if engine == "fsdp" else DDPEngine
    cfg = _cfg(f"parallel.deepspeed_config={_write(tmp_path, {})}", f"parallel.strategy={engine}")
    eng = cls(cfg, DistInfo(0, 2, 0), torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match=f"parallel.strategy={engine}; set parallel.strategy=deepspeed"):
        eng.wrap(torch.nn.Linear(2, 2))
