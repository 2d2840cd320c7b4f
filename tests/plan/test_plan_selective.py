"""train.checkpoint_policy=selective in the planner (llama-3-8b, 1x H200): memory between layer checkpointing and
none, faster than layer checkpointing, carried by TrainSetup and applied back to the config. Not yet checked
against a GPU measurement; the per-layer bytes are checked against CPU in tests/model/test_selective_checkpointing.py."""

from __future__ import annotations

from shardtune.config import load_config
from shardtune.hardware import parse_gpus
from shardtune.plan import estimate
from shardtune.plan.setup import apply_setup


def _cfg(*extra):
    return load_config(None, ["model.name_or_path=llama-3-8b", "data.max_seq_len=2048", "train.kernels=liger",
                              "train.micro_batch_size=4", "lora.rank=16", *extra])


def _est(*extra):
    return estimate(_cfg(*extra), parse_gpus("1xH200"))


def test_selective_sits_between_layer_and_none():
    none = _est("train.gradient_checkpointing=false")
    layer = _est("train.gradient_checkpointing=true")
    sel = _est("train.gradient_checkpointing=true", "train.checkpoint_policy=selective")
    assert layer.memory.peak_allocated < sel.memory.peak_allocated < none.memory.peak_allocated
    assert layer.speed.tokens_per_s < sel.speed.tokens_per_s
    # no base matmul or attention runs twice: the FLOPs are those of no checkpointing plus LoRA's B matmul
    assert none.speed.flops_per_token < sel.speed.flops_per_token < 1.01 * none.speed.flops_per_token
    # without gradient checkpointing the policy changes nothing (as checkpoint_layers)
    off = _est("train.gradient_checkpointing=false", "train.checkpoint_policy=selective")
    assert off.memory.peak_allocated == none.memory.peak_allocated


def test_selective_layers_count_only_the_recomputed_ones():
    half = _est("train.gradient_checkpointing=true", "train.checkpoint_policy=selective", "train.checkpoint_layers=16")
    sel = _est("train.gradient_checkpointing=true", "train.checkpoint_policy=selective")
    none = _est("train.gradient_checkpointing=false")
    assert sel.memory.peak_allocated < half.memory.peak_allocated < none.memory.peak_allocated


def test_setup_carries_the_policy():
    from shardtune.plan.setup import setup_from_config
    hw = parse_gpus("1xH200")
    cfg = _cfg("train.gradient_checkpointing=true", "train.checkpoint_policy=selective")
    setup = setup_from_config(cfg, hw)
    assert setup.ckpt_policy == "selective"
    assert apply_setup(_cfg(), setup).train.checkpoint_policy == "selective"
    assert setup_from_config(_cfg(), hw).ckpt_policy == "layer"


def test_offloading_cannot_move_what_selective_keeps():
    """Offloading under selective checkpointing moves only the layer inputs (the kept matmul outputs live in the
    checkpoint's cache; tests/train/test_offload_activations.py): memory stays above the outputs kept, and the PCIe
    bytes equal whole-layer checkpointing's."""
    from shardtune.plan.activations import offload_stays_bytes_per_token
    from shardtune.plan.speed import activation_bytes_moved
    sel = ("train.gradient_checkpointing=true", "train.checkpoint_policy=selective", "train.micro_batch_size=4")
    kept, off = _est(*sel), _est(*sel, "train.offload_activations=true")
    layer_off = _est("train.gradient_checkpointing=true", "train.micro_batch_size=4", "train.offload_activations=true")
    stays = offload_stays_bytes_per_token(off.shape, off.setup) * off.setup.tokens
    assert stays > 10 * 2**30
    assert off.memory.peak_allocated > stays and off.memory.peak_allocated <= kept.memory.peak_allocated
    assert activation_bytes_moved(off.shape, off.setup) == activation_bytes_moved(layer_off.shape, layer_off.setup)
