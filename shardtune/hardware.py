"""GPU catalogue, `--gpus` strings ("8xV100-32GB", "2xRTX4090", "1x24GB", "4xH200@24GB") and local detection.

Numbers are vendor datasheet values: memory as the driver reports it (MiB), dense (non-sparse) bf16/fp16 tensor-core
peak with fp32 accumulation (what PyTorch matmuls use), HBM/GDDR bandwidth, and the GPU-to-GPU link of the usual
server build (NVLink for SXM parts, PCIe otherwise). The planner multiplies these by efficiency factors that are
fitted to measurements (shardtune.plan.speed.SpeedConstants). Importing this module does not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from shardtune.errors import ConfigError

MiB = 1024 ** 2
GiB = 1024 ** 3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int
    bf16: bool                      # native bfloat16 (Ampere and newer)
    peak_tflops: float              # dense bf16 (fp16 where bf16 is missing) tensor-core TFLOP/s, fp32 accumulate
    mem_bandwidth_gbs: float        # device memory bandwidth, GB/s
    link_gbs: float                 # GPU<->GPU bandwidth per GPU for collectives, GB/s per direction
    link: str                       # "NVLink" | "PCIe"
    pcie_gbs: float = 20.0          # host<->device link, GB/s per direction: nominal for PCIe 5.0 x16 boards (63),
                                    # older entries as first catalogued; PlanConstants.pcie_eff derates it
    aliases: tuple[str, ...] = ()
    mfu_ceiling_tflops: float | None = None   # measured dense bf16 matmul ceiling, when known (MFU denominator)

    @property
    def mfu_peak_tflops(self) -> float:
        return self.mfu_ceiling_tflops or self.peak_tflops

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


def _g(name, mib, bf16, tflops, bw, link_gbs, link, pcie=20.0, aliases=(), ceiling=None):
    return GPUSpec(name, mib * MiB, bf16, tflops, bw, link_gbs, link, pcie, tuple(aliases), ceiling)


# Memory in MiB as nvidia-smi / torch.cuda.get_device_properties report it for each board. A name is
# "<family>[-<variant>]-<memory>GB"; `aliases` are other spellings of the family (matched as whole words) or of this
# exact board. Within a family the first entry is the one a bare family name means (the SXM part where there is one).
GPU_CATALOGUE: dict[str, GPUSpec] = {g.name: g for g in [
    _g("V100-16GB", 16160, False, 125, 900, 150, "NVLink", 12, ["V100"]),
    _g("V100-32GB", 32510, False, 125, 900, 150, "NVLink", 12, ["V100S"]),
    _g("T4-16GB", 15360, False, 65, 320, 12, "PCIe", 12, ["T4"]),
    _g("A100-40GB", 40960, True, 312, 1555, 300, "NVLink", 25, ["A100"]),
    _g("A100-80GB", 81920, True, 312, 2039, 300, "NVLink", 25, ["A100"]),
    _g("A100-PCIe-40GB", 40960, True, 312, 1555, 25, "PCIe", 25, ["A100"]),
    _g("A100-PCIe-80GB", 81920, True, 312, 1935, 25, "PCIe", 25, ["A100"]),
    _g("H100-80GB", 81559, True, 989, 3350, 450, "NVLink", 63, ["H100"],
       800),   # ceiling: bench/ measurement on this project's H100/H200 machines (docs/benchmarks.md)
    _g("H100-PCIe-80GB", 81559, True, 756, 2000, 50, "PCIe", 63, ["H100"]),
    _g("H100-NVL-94GB", 95830, True, 835, 3900, 300, "NVLink", 63, ["H100"]),
    _g("H200-141GB", 143771, True, 989, 4800, 450, "NVLink", 63, ["H200"], 800),
    _g("RTX2080Ti-11GB", 11264, False, 54, 616, 12, "PCIe", 12, ["RTX2080Ti", "2080Ti"]),
    _g("RTX3090-24GB", 24576, True, 71, 936, 20, "PCIe", 20, ["RTX3090", "3090"]),
    _g("RTX4080-16GB", 16376, True, 97.5, 717, 25, "PCIe", 25, ["RTX4080", "4080"]),
    _g("RTX4090-24GB", 24564, True, 165, 1008, 20, "PCIe", 20, ["RTX4090", "4090"]),
    _g("RTX5090-32GB", 32607, True, 209.5, 1792, 50, "PCIe", 63, ["RTX5090", "5090"]),
    _g("A10G-24GB", 23028, True, 70, 600, 12, "PCIe", 12, ["A10G"]),
    _g("A10-24GB", 23028, True, 125, 600, 20, "PCIe", 20, ["A10"]),
    _g("L4-24GB", 23034, True, 121, 300, 20, "PCIe", 20, ["L4"]),
    _g("A5000-24GB", 24564, True, 111, 768, 56, "NVLink", 20, ["A5000", "RTX A5000"]),
    _g("A6000-48GB", 49140, True, 155, 768, 56, "NVLink", 20, ["A6000", "RTX A6000"]),
    _g("RTX6000Ada-48GB", 49140, True, 364, 960, 25, "PCIe", 25, ["RTX 6000 Ada", "RTX6000 Ada Generation"]),
    _g("A40-48GB", 46068, True, 150, 696, 56, "NVLink", 25, ["A40"]),
    _g("L40-48GB", 46068, True, 181, 864, 25, "PCIe", 25, ["L40"]),
    _g("L40S-48GB", 46068, True, 362, 864, 25, "PCIe", 25, ["L40S"]),
]}

# Accelerators people ask about that the planner does not model: a clear refusal instead of a wrong plan.
NOT_MODELLED = {   # word in the name -> (what it is, its memory per device in GB)
    "mi250": ("AMD Instinct MI250", 128), "mi250x": ("AMD Instinct MI250X", 128),
    "mi300x": ("AMD Instinct MI300X", 192), "mi300a": ("AMD Instinct MI300A", 128),
    "mi325x": ("AMD Instinct MI325X", 256), "gaudi2": ("Intel Gaudi 2", 96), "gaudi3": ("Intel Gaudi 3", 128),
}

# A GPU given only by memory ("1x24GB"): a mid-range PCIe card. Speed numbers are placeholders; say so in reports.
GENERIC = GPUSpec("generic", 0, True, 100.0, 900.0, 20.0, "PCIe", 20.0)

DEFAULT_INTER_NODE_GBS = 12.5   # 100 Gbit/s Ethernet/InfiniBand per node


@dataclass(frozen=True)
class Hardware:
    """The machines a run is planned for: `gpus_per_node` GPUs of one kind on each of `nodes` nodes."""

    gpu: GPUSpec
    gpus_per_node: int = 1
    nodes: int = 1
    cpu_ram_bytes: int | None = None        # per node; None = unknown
    inter_node_gbs: float = DEFAULT_INTER_NODE_GBS
    source: str = "given"                  # "given" (--gpus / plan.gpus) or "detected"
    memory_cap_bytes: int | None = None     # "@24GB": per-process cap below the board's memory

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def gpu_memory_bytes(self) -> int:
        """Memory one process may use: the cap if one was given, else the board's memory."""
        return self.memory_cap_bytes or self.gpu.memory_bytes

    def cpu_ram(self) -> int | None:
        """CPU RAM per node in bytes: given (--cpu-ram), or detected for this machine's GPUs; None when unknown.
        It is never guessed from the GPUs: an offload plan needs it (shardtune.plan.cpu_ram)."""
        return int(self.cpu_ram_bytes) if self.cpu_ram_bytes else None

    def describe(self) -> str:
        mem = self.gpu_memory_bytes / GiB
        cap = f"@{mem:.0f}GiB" if self.memory_cap_bytes else ""
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus_per_node}x{self.gpu.name}{cap}{nodes} ({mem:.1f} GiB each)"

    def with_world(self, gpus_per_node: int, nodes: int = 1) -> "Hardware":
        return replace(self, gpus_per_node=gpus_per_node, nodes=nodes)

    def to_dict(self) -> dict:
        return {"gpu": self.gpu.name, "gpus_per_node": self.gpus_per_node, "nodes": self.nodes,
                "world_size": self.world_size, "gpu_memory_bytes": self.gpu_memory_bytes,
                "cpu_ram_bytes": self.cpu_ram_bytes, "bf16": self.gpu.bf16, "peak_tflops": self.gpu.peak_tflops,
                "mem_bandwidth_gbs": self.gpu.mem_bandwidth_gbs, "link": self.gpu.link,
                "link_gbs": self.gpu.link_gbs, "pcie_gbs": self.gpu.pcie_gbs, "source": self.source}


_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "instinct", "intel", "google"}
_VARIANTS = {"sxm": "SXM", "sxm2": "SXM", "sxm4": "SXM", "sxm5": "SXM", "pcie": "PCIe", "nvl": "NVL"}
_NAME_RE = re.compile(r"^(?P<family>[A-Za-z0-9]+)(?:-(?P<variant>[A-Za-z]+))?-(?P<mem>\d+)GB$")


def _words(name: str) -> list[str]:
    # a MIG slice ("A100-SXM4-80GB MIG 1g.10gb") is planned as its board; torch reports the slice's memory anyway
    s = re.sub(r"\bmig\b.*$", "", name.lower())
    return [w for w in re.split(r"[^a-z0-9]+", s) if w and w not in _VENDOR_WORDS]


def _joins(words: list[str]) -> set[str]:
    """Every run of consecutive words written together: 'rtx 4090' matches RTX4090, 'l40' never matches 'l4'."""
    return {"".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def _stated_memory_gb(words: list[str]) -> int | None:
    for i, w in enumerate(words):
        m = re.fullmatch(r"(\d+)(?:gb|gib|g)", w)
        if m:
            return int(m.group(1))
        if w.isdigit() and i + 1 < len(words) and words[i + 1] in ("gb", "gib"):
            return int(w)
    return None


def _family(g: GPUSpec) -> str:
    m = _NAME_RE.match(g.name)
    return m.group("family") if m else g.name


def _variant(g: GPUSpec) -> str:
    m = _NAME_RE.match(g.name)
    return (m.group("variant") or "") if m else ""


def _family_keys(g: GPUSpec) -> set[str]:
    return {"".join(_words(a)) for a in (_family(g), *g.aliases)} - {""}


def lookup_gpu(name: str) -> GPUSpec:
    """The catalogue entry a GPU name means, matched by whole words (L40 is not L4) with the memory stated in the name
    deciding between boards of one family (A100-PCIE-80GB is the 80 GB card). Unknown names, memory no board of the
    family has, and accelerators the planner does not model are ConfigErrors naming the close matches."""
    words = _words(name)
    joins = _joins(words)
    for key, (what, gb) in NOT_MODELLED.items():
        if key in joins:
            raise ConfigError(f"GPU '{name}': {what} is not modelled by the planner (its 4-bit kernels, memory and "
                              f"speed figures are NVIDIA CUDA ones); plan by memory alone (--gpus 1x{gb}GB) and "
                              "treat the predicted speed as a placeholder")
    hits = [(len(k), g) for g in GPU_CATALOGUE.values() for k in _family_keys(g) if k in joins]
    if not hits:
        raise ConfigError(f"unknown GPU '{name}'{_close_matches(name)}; or give the memory alone (e.g. 1x24GB)")
    longest = max(n for n, _ in hits)
    family = [g for g in GPU_CATALOGUE.values() if any(n == longest and h is g for n, h in hits)]
    mem = _stated_memory_gb(words)
    if mem is not None:
        sized = [g for g in family if abs(g.memory_bytes / GiB - mem) <= 0.08 * mem]
        if not sized:
            have = ", ".join(g.name for g in family)
            raise ConfigError(f"GPU '{name}': no {_family(family[0])} board has {mem} GB (known: {have}); check "
                              "the name or give the memory alone (e.g. 1x24GB)")
        family = sized
    stated = {_VARIANTS[w] for w in words if w in _VARIANTS}
    if stated:
        family = [g for g in family if _variant(g).upper() in {v.upper() for v in stated}
                  or (not _variant(g) and stated == {"SXM"})] or family
    return family[0]


def _close_matches(name: str) -> str:
    import difflib
    names = list(GPU_CATALOGUE)
    near = difflib.get_close_matches(name.upper(), [n.upper() for n in names], n=4, cutoff=0.4)
    near = [n for n in names if n.upper() in near]
    return f" (close: {', '.join(near)})" if near else f"; known: {', '.join(names)}"


def find_gpu(name: str) -> GPUSpec | None:
    """Catalogue entry for a GPU name ('V100-32GB', 'a100', 'NVIDIA H100 80GB HBM3'), or None when unknown.
    Accelerators the planner refuses (AMD, Intel, TPU) raise the refusal."""
    try:
        return lookup_gpu(name)
    except ConfigError as e:
        if "is not modelled" in str(e):
            raise
        return None


_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(gb|gib|g)$", re.I)


def _parse_mem(text: str) -> int | None:
    m = _MEM_RE.match(text.strip())
    # GPU memory sizes are binary in practice: a "24GB" card has 24 GiB (24576 MiB).
    return int(float(m.group(1)) * GiB) if m else None


def parse_gpus(text: str, nodes: int = 1, cpu_ram_bytes: int | None = None,
               inter_node_gbs: float = DEFAULT_INTER_NODE_GBS) -> Hardware:
    """'8xV100-32GB', '2xRTX4090', '1x24GB' (memory only), '4xH200@24GB' (H200 speed, 24 GiB per process),
    'H100' (one GPU). Counts are per node; `nodes` multiplies them."""
    raw = (text or "").strip()
    m = re.match(r"^(?:(\d+)\s*[x×*]\s*)?(.+?)(?:@(.+))?$", raw, re.I)
    if not raw or not m:
        raise ConfigError(f"--gpus '{text}' is not understood; use e.g. 8xV100-32GB, 2xRTX4090, 1x24GB or 4xH200@24GB")
    count = int(m.group(1) or 1)
    what, cap_text = m.group(2).strip(), m.group(3)
    if count < 1 or nodes < 1:
        raise ConfigError(f"--gpus '{text}': GPU and node counts must be >= 1")
    cap = None
    if cap_text is not None:
        cap = _parse_mem(cap_text)
        if cap is None:
            raise ConfigError(f"--gpus '{text}': the cap after '@' must be a memory size such as 24GB")
    mem = _parse_mem(what)
    if mem is not None:
        gpu = replace(GENERIC, name=f"generic-{mem / GiB:g}GB", memory_bytes=mem)
    else:
        try:
            gpu = lookup_gpu(what)
        except ConfigError as e:
            raise ConfigError(f"--gpus '{text}': {e}") from None
    if cap is not None and cap > gpu.memory_bytes:
        raise ConfigError(f"--gpus '{text}': cap {cap_text} is more than the {gpu.name}'s "
                          f"{gpu.memory_bytes / GiB:.0f} GiB")
    return Hardware(gpu=gpu, gpus_per_node=count, nodes=nodes, cpu_ram_bytes=cpu_ram_bytes,
                    inter_node_gbs=inter_node_gbs, memory_cap_bytes=cap)


def cpu_ram_bytes() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except Exception:
        return None


def detect_hardware(nodes: int = 1) -> Hardware | None:
    """The GPUs torch can see on this machine (name matched to the catalogue, real memory), or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    props = torch.cuda.get_device_properties(0)
    count = torch.cuda.device_count()
    spec = find_gpu(props.name)
    if spec is None:
        major = getattr(props, "major", 8)
        spec = replace(GENERIC, name=props.name, bf16=major >= 8)
    spec = replace(spec, memory_bytes=int(props.total_memory))
    return Hardware(gpu=spec, gpus_per_node=count, nodes=nodes, cpu_ram_bytes=cpu_ram_bytes(), source="detected")


def parse_memory(text: str) -> int:
    """'512GB', '1.5TB', '768GiB' -> bytes (binary units, as RAM is sold)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(t|tb|tib|g|gb|gib)\s*$", str(text), re.I)
    if not m:
        raise ConfigError(f"memory size '{text}' is not understood; use e.g. 512GB or 1.5TB")
    scale = 1024 ** 4 if m.group(2).lower().startswith("t") else GiB
    return int(float(m.group(1)) * scale)


def hardware_for(gpus: str | None, nodes: int = 1, cpu_ram: int | None = None) -> Hardware:
    """`gpus` if given (CPU RAM: `cpu_ram` bytes per node, else unknown), else the detected GPUs and this
    machine's RAM; without either, an error that says how to name them."""
    if gpus:
        return parse_gpus(gpus, nodes=nodes, cpu_ram_bytes=cpu_ram)
    hw = detect_hardware(nodes)
    if hw is not None and cpu_ram:
        hw = replace(hw, cpu_ram_bytes=cpu_ram)
    if hw is None:
        raise ConfigError("no GPU detected and none given; pass --gpus (e.g. --gpus 8xV100-32GB or 1x24GB) "
                          "or set plan.gpus in the config")
    return hw
