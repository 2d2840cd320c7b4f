"""`TrainSetup`: the few facts about a run that decide its memory and speed, taken from a RunConfig and the hardware.

The planner works on this flat, hashable record rather than on RunConfig so the search can vary one field at a time
and calibration records (plain JSON) can be turned into one directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shardtune.errors import ConfigError
from shardtune.resolve import (STRATEGIES, liger_installed, resolve_kernels, resolve_loss_path,
                               resolve_precision, resolve_strategy, with_deepspeed_json)

METHODS = ("full", "lora", "qlora", "int8")
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
# What the planner can model. shardtune: how shardtune runs (docs/planner.md). hf: the Hugging Face Trainer + peft +
# bitsandbytes stack people compare against: full-logits loss, no Liger, prepare_model_for_kbit_training's fp32
# upcast of every non-quantized parameter (4-bit/8-bit bases), LoRA in fp32 or (QLoRA paper script) bf16, paged
# optimizers whose states bitsandbytes pages to CPU memory when the GPU runs out.
STACKS = ("shardtune", "hf")
FSDP_PAIR_MAX_BYTES = 512 * 2 ** 20  # auto puts two decoder layers in one FSDP unit when they gather to this or less


def fsdp_layers_per_unit(requested: int, layer_gather_bytes: float, layers: int) -> int:
    """Decoder layers per FSDP unit. A unit costs host time in its hooks and a synchronisation of the ranks at each
    gather; at small per-GPU batches a sharded QLoRA step is bound by that host time (docs/benchmarks.md: two 8B
    layers per unit took a 2x H200 step from 0.81 to 0.57 s at micro batch 2). `0` (auto) pairs layers whose
    gathered bytes are small (4-bit layers of 8B-13B models), keeping big layers (70B, 16-bit weights) one per unit
    so the gathered memory stays small. The engine and the planner both decide with this function."""
    if requested >= 1:
        return min(requested, max(1, layers))
    return 2 if layers >= 2 and 2 * layer_gather_bytes <= FSDP_PAIR_MAX_BYTES else 1


@dataclass(frozen=True)
class TrainSetup:
    method: str = "qlora"               # full | lora | qlora | int8
    strategy: str = "none"              # none | ddp | fsdp | deepspeed
    zero_stage: int = 3                 # deepspeed stage; fsdp: 2 = reshard_after_forward False, 3 = True
    offload_optimizer: bool = False
    offload_param: bool = False
    world_size: int = 1
    gpus_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    grad_ckpt: bool = True
    ckpt_layers: int = 0                # with grad_ckpt: decoder layers recomputed (0 = all; train.checkpoint_layers)
    ckpt_policy: str = "layer"          # with grad_ckpt: layer | selective (train.checkpoint_policy)
    precision: str = "bf16"             # compute dtype: bf16 | fp16 | fp32
    lora_rank: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    modules_to_save: tuple[str, ...] = ()
    quant_type: str = "nf4"
    double_quant: bool = True
    optimizer: str = "adamw"            # adamw | adamw_8bit | paged_adamw_8bit
    kernels: str = "none"               # liger (fused RMSNorm/RoPE/SwiGLU) | none (transformers' modules)
    fused_loss: str = "none"            # none (full logits) | liger (fused linear CE) | chunked (2048-token chunks)
    fsdp_layers_per_unit: int = 0       # fsdp: decoder layers per FSDP unit (0 = auto, see fsdp_layers_per_unit())
    stack: str = "shardtune"            # shardtune | hf (HF Trainer + peft + bitsandbytes, see STACKS)
    lora_dtype: str = "fp32"            # LoRA weights: fp32 (peft's default) | bf16 (the QLoRA paper's script; hf only)
    # hf only: prepare_model_for_kbit_training casts non-quantized parameters to fp32; peft skips that cast for
    # GPTQ-quantized models (Qwen's Q-LoRA), so a GPTQ base keeps its bf16 norms, embeddings and residual stream
    kbit_upcast: bool = True
    # hf only: the training loop holds the model output until backward is done (Answer.AI's train.py keeps
    # `output = model(...)` until after `loss.backward()`; HF Trainer's compute_loss returns only the loss), so
    # its fp32 logits stay alive through every backward phase: +4 B per logit (tests/plan/test_plan_hf_loss.py)
    keeps_output: bool = False
    # hf only, strategy ddp: FSDP's NO_SHARD strategy (Answer.AI's "DDP"), replicas run through FSDP's flat
    # parameters, streams and hooks instead of DistributedDataParallel: the sharded engines' allocator cache applies
    fsdp_no_shard: bool = False
    # data.packing: rows carry position_ids that restart per sample and transformers builds a block-diagonal bool
    # mask from them; SDPA's masked path then repeats K/V to the query heads and keeps an additive mask per layer
    packed: bool = False
    # train.fused_lora: LoRA's dropout regenerated in backward (shardtune/model/lora_fused.py): lora_A keeps the
    # input it shares with the base linears instead of its own dropped-out copy and mask
    fused_lora: bool = False
    # train.offload_activations: saved activations go to pinned CPU memory in forward and come back for backward
    # (shardtune/train/offload.py), each byte over PCIe once each way
    offload_activations: bool = False
    # train.offload_layers: with offload_activations, only the first n decoder layers that do not recompute
    offload_layers: int | None = None
    # parallel.zero3_leaf_layers: DeepSpeed ZeRO-3 hooks each decoder layer once (a leaf) instead of every submodule
    zero3_leaf: bool = False
    # parallel.zero3_load=cpu: DeepSpeed ZeRO-3 loads the whole model into CPU RAM per rank and partitions it onto
    # the GPUs one parameter at a time (otherwise a whole replica on each GPU first)
    zero3_cpu_load: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"train.method={self.method!r}; allowed: {' | '.join(METHODS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"parallel.strategy={self.strategy!r}; allowed: {' | '.join(STRATEGIES)}")
        if self.precision not in ELEMENT_BYTES:
            raise ConfigError(f"train.precision={self.precision!r}; allowed: bf16 | fp16 | fp32")
        if self.fused_loss not in ("none", "liger", "chunked"):
            raise ConfigError(f"fused loss {self.fused_loss!r}; the plan needs none | liger | chunked")
        if self.kernels not in ("liger", "none"):
            raise ConfigError(f"train.kernels={self.kernels!r}; the plan needs liger | none")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage!r}; allowed: 2 | 3")
        if self.stack not in STACKS:
            raise ConfigError(f"--stack {self.stack!r}; allowed: {' | '.join(STACKS)}")
        if (self.keeps_output or self.fsdp_no_shard) and self.stack != "hf":
            raise ConfigError("keeps_output / fsdp_no_shard describe another training stack: --stack hf profiles only")
        if self.fsdp_no_shard and self.strategy != "ddp":
            raise ConfigError("fsdp_no_shard is FSDP's NO_SHARD strategy: plan it with parallel.strategy=ddp")
        if self.lora_dtype not in ("fp32", "bf16") or (self.lora_dtype != "fp32" and self.stack != "hf"):
            raise ConfigError(f"--lora-dtype {self.lora_dtype!r}: shardtune trains LoRA in fp32; bf16 LoRA weights "
                              "are a --stack hf profile (the QLoRA paper's script)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r}; allowed: {' | '.join(OPTIMIZERS)}")

    # ---- derived
    @property
    def elem(self) -> int:
        """Bytes per element of the compute dtype (activations, non-quantized weights, 4-bit storage dtype)."""
        return ELEMENT_BYTES[self.precision]

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.gpus_per_node))

    @property
    def shards_params(self) -> bool:
        """Parameters live sharded 1/N at rest (FSDP in either mode, ZeRO-3)."""
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)

    @property
    def gathers_all_params(self) -> bool:
        """FSDP with reshard_after_forward=False keeps every layer unsharded from its forward to its backward."""
        return self.strategy == "fsdp" and self.zero_stage == 2

    @property
    def shards_states(self) -> bool:
        """Gradients and optimizer states partitioned 1/N (FSDP, ZeRO-2, ZeRO-3)."""
        return self.strategy in ("fsdp", "deepspeed")

    @property
    def label(self) -> str:
        s = self.strategy
        if s == "fsdp":
            s = "fsdp" if self.zero_stage == 3 else "fsdp(zero2)"
        elif s == "deepspeed":
            s = f"zero{self.zero_stage}"
        off = []
        if self.offload_optimizer:
            off.append("opt")
        if self.offload_param:
            off.append("param")
        off_s = f" offload={'+'.join(off)}" if off else ""
        stack = f" stack=hf(lora {self.lora_dtype}, {self.optimizer})" if self.stack == "hf" else ""
        ckpt = ("on" if not self.ckpt_layers else f"{self.ckpt_layers} layers") if self.grad_ckpt else "off"
        ckpt += " fused-lora" if self.fused_lora else ""
        return (f"{self.method} {s} x{self.world_size}{off_s} ckpt={ckpt} "
                f"micro={self.micro_batch} accum={self.grad_accum} seq={self.seq_len}{stack}")

    def invalid_reason(self) -> str | None:
        """Why this combination cannot run at all (None if it can)."""
        if self.world_size < 1 or self.micro_batch < 1 or self.grad_accum < 1 or self.seq_len < 1:
            return "sizes must be >= 1"
        if self.strategy == "none" and self.world_size > 1:
            return "strategy none runs one process; use ddp, fsdp or deepspeed for several GPUs"
        if (self.offload_optimizer or self.offload_param) and self.strategy in ("none", "ddp"):
            return "CPU offload needs strategy fsdp or deepspeed"
        if self.offload_param and self.strategy == "deepspeed" and self.zero_stage != 3:
            return "offload_param needs ZeRO stage 3"
        if self.method == "int8" and self.shards_params:
            return "int8 (LLM.int8) weights cannot be sharded by fsdp/ZeRO-3; use qlora, or ddp/zero2"
        if self.optimizer != "adamw" and self.strategy == "fsdp":
            return "bitsandbytes 8-bit optimizers cannot step FSDP2's DTensor parameters; use train.optimizer=adamw"
        if self.fused_lora and (self.method == "full" or (self.strategy == "deepspeed" and self.zero_stage == 3)):
            return "fused LoRA needs LoRA weights gathered with their layer (not full fine-tuning, not ZeRO-3)"
        if self.optimizer != "adamw" and self.offload_optimizer:
            return "8-bit optimizers cannot run on offloaded (CPU) states; use train.optimizer=adamw"
        return None

    def replace(self, **kw) -> "TrainSetup":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["lora_targets"], tuple):
            d["lora_targets"] = list(d["lora_targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSetup":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("lora_targets"), list):
            kw["lora_targets"] = tuple(kw["lora_targets"])
        if isinstance(kw.get("modules_to_save"), list):
            kw["modules_to_save"] = tuple(kw["modules_to_save"])
        return cls(**kw)


def liger_on_target(hw) -> bool:
    """Whether the planned GPUs run Liger (fused loss, kernels): checked here for this machine's GPUs, assumed
    (shardtune[gpu] installs liger-kernel) for GPUs named with --gpus. Manual and auto plans both use this one rule,
    so they plan the same loss path for the same config."""
    local = getattr(hw, "source", "given") == "detected"
    return liger_installed() if local else True


def setup_from_config(cfg, hw, model_type: str | None = None, kernels: str | None = None,
                      fused_loss: str | None = None, stack: dict | None = None) -> TrainSetup:
    """The TrainSetup a RunConfig describes on hardware `hw` (world size = all GPUs of hw). `kernels` and
    `fused_loss` override the auto resolution (the trainer knows what it actually runs). `stack`: TrainSetup fields
    of a stack profile ({"stack": "hf", "lora_dtype": ..., "optimizer": ...}); the hf stack has neither Liger nor a
    fused loss."""
    if stack and stack.get("stack") == "hf":
        kernels, fused_loss = "none", "none"
    cfg = with_deepspeed_json(cfg)
    t, p, lora = cfg.train, cfg.parallel, cfg.lora
    liger = liger_on_target(hw)
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    world = hw.world_size
    strategy = resolve_strategy(cfg, world, planning=True)
    profile = {k: v for k, v in (stack or {}).items() if v is not None}
    return TrainSetup(
        method=t.method, strategy=strategy, zero_stage=int(p.zero_stage), offload_optimizer=bool(p.offload_optimizer),
        offload_param=bool(p.offload_param), world_size=world, gpus_per_node=hw.gpus_per_node,
        micro_batch=t.micro_batch_size, seq_len=cfg.data.max_seq_len, grad_accum=t.grad_accum,
        grad_ckpt=bool(t.gradient_checkpointing), ckpt_layers=int(getattr(t, "checkpoint_layers", None) or 0),
        ckpt_policy=str(getattr(t, "checkpoint_policy", "layer")),
        fused_lora=bool(getattr(t, "fused_lora", False)) and t.method != "full"
        and (stack or {}).get("stack", "shardtune") == "shardtune"
        and not (strategy == "deepspeed" and int(p.zero_stage) == 3),
        offload_activations=bool(getattr(t, "offload_activations", False)),
        offload_layers=getattr(t, "offload_layers", None),
        zero3_leaf=bool(getattr(p, "zero3_leaf_layers", False)) and strategy == "deepspeed" and int(p.zero_stage) == 3,
        zero3_cpu_load=getattr(p, "zero3_load", "gpu") == "cpu" and strategy == "deepspeed" and int(p.zero_stage) == 3,
        precision=resolve_precision(t.precision, on_gpu=True, gpu_bf16=hw.gpu.bf16, gpu_name=hw.gpu.name),
        lora_rank=lora.rank, lora_targets=targets, lora_dropout=float(lora.dropout),
        modules_to_save=tuple(lora.modules_to_save), quant_type=cfg.quant.quant_type,
        double_quant=bool(cfg.quant.double_quant), optimizer=profile.pop("optimizer", t.optimizer),
        kernels=kernels or resolve_kernels(getattr(t, "kernels", "none"), liger),
        fused_loss=fused_loss or resolve_loss_path(getattr(t, "fused_loss", False), model_type, liger),
        fsdp_layers_per_unit=int(getattr(p, "fsdp_layers_per_unit", 0)), packed=bool(cfg.data.packing),
        **profile)


def apply_setup(cfg, setup: TrainSetup):
    """A copy of `cfg` changed to run `setup` (what auto hands the trainer)."""
    import copy
    new = copy.deepcopy(cfg)
    new.train.method = setup.method
    new.train.micro_batch_size = setup.micro_batch
    new.train.grad_accum = setup.grad_accum
    new.train.gradient_checkpointing = setup.grad_ckpt
    new.train.checkpoint_layers = setup.ckpt_layers or None
    new.train.checkpoint_policy = setup.ckpt_policy
    new.train.fused_lora = setup.fused_lora
    new.parallel.strategy = setup.strategy
    new.parallel.zero_stage = setup.zero_stage
    new.parallel.offload_optimizer = setup.offload_optimizer
    new.parallel.offload_param = setup.offload_param
    new.data.max_seq_len = setup.seq_len
    # the plan's choices count as set by the user: a DeepSpeed JSON must not override them
    new.explicit_keys = frozenset(getattr(cfg, "explicit_keys", ())) | set(APPLIED_KEYS.values())
    return new


# TrainSetup field -> the config key apply_setup writes it to
APPLIED_KEYS = {"method": "train.method", "micro_batch": "train.micro_batch_size", "grad_accum": "train.grad_accum",
                "grad_ckpt": "train.gradient_checkpointing", "ckpt_layers": "train.checkpoint_layers",
                "ckpt_policy": "train.checkpoint_policy",
                "fused_lora": "train.fused_lora",
                "strategy": "parallel.strategy",
                "zero_stage": "parallel.zero_stage", "offload_optimizer": "parallel.offload_optimizer",
                "offload_param": "parallel.offload_param", "seq_len": "data.max_seq_len"}


def fixed_by_deepspeed_json(cfg) -> dict:
    """TrainSetup fields a search must keep: with a DeepSpeed JSON the engine is DeepSpeed, and the JSON's
    explicit stage, offloads, micro batch and accumulation decide those fields."""
    if not cfg.parallel.deepspeed_config:
        return {}
    from shardtune.resolve import deepspeed_json_values, read_deepspeed_json
    decided = deepspeed_json_values(read_deepspeed_json(cfg.parallel.deepspeed_config))
    adopted = with_deepspeed_json(cfg)
    fixed = {"strategy": "deepspeed"}
    for field_name, key in APPLIED_KEYS.items():
        if key in decided:
            section, name = key.split(".")
            fixed[field_name] = getattr(getattr(adopted, section), name)
    return fixed
