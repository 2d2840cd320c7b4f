"""GPU catalogue and --gpus strings."""

from __future__ import annotations

import pytest

from shardtune.errors import ConfigError
from shardtune.hardware import GiB, MiB, detect_hardware, find_gpu, parse_gpus, parse_memory


def test_count_and_catalogue_name():
    hw = parse_gpus("8xV100-32GB")
    assert hw.world_size == 8 and hw.gpus_per_node == 8 and hw.nodes == 1
    assert hw.gpu.name == "V100-32GB" and hw.gpu.bf16 is False
    assert hw.gpu_memory_bytes == 32510 * MiB


def test_names_without_memory_suffix_and_nodes():
    hw = parse_gpus("2xRTX4090", nodes=2)
    assert hw.gpu.name == "RTX4090-24GB" and hw.world_size == 4 and hw.nodes == 2
    assert parse_gpus("H100").gpu.name == "H100-80GB"
    assert parse_gpus("4 x a100-80gb").gpu.memory_bytes == 81920 * MiB


def test_raw_memory_is_a_generic_gpu():
    hw = parse_gpus("1x24GB")
    assert hw.gpu_memory_bytes == 24 * GiB and hw.gpu.name.startswith("generic")
    assert hw.world_size == 1


def test_cap_keeps_the_gpu_speed_but_caps_memory():
    hw = parse_gpus("4xH200@24GB")
    assert hw.gpu.name == "H200-141GB" and hw.gpu.peak_tflops == parse_gpus("H200").gpu.peak_tflops
    assert hw.gpu_memory_bytes == 24 * GiB and hw.memory_cap_bytes == 24 * GiB
    with pytest.raises(ConfigError, match="more than"):
        parse_gpus("1xRTX4090@48GB")


@pytest.mark.parametrize("bad", ["", "8xFooGPU", "x", "2xH100@lots"])
def test_bad_strings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_gpus(bad)


def test_device_names_as_torch_reports_them():
    assert find_gpu("NVIDIA H100 80GB HBM3").name == "H100-80GB"
    assert find_gpu("Tesla V100-SXM2-32GB").name == "V100-32GB"
    assert find_gpu("NVIDIA GeForce RTX 3090").name == "RTX3090-24GB"
    assert find_gpu("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert find_gpu("Quantum Accelerator 9000") is None


def test_catalogue_covers_the_issue_list():
    for name in ["V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "RTX2080Ti-11GB",
                 "RTX3090-24GB", "RTX4090-24GB", "A10G-24GB", "L4-24GB", "A6000-48GB", "L40S-48GB"]:
        g = parse_gpus(name).gpu
        assert g.peak_tflops > 0 and g.mem_bandwidth_gbs > 0 and g.link_gbs > 0


def test_cpu_ram_is_never_assumed():
    """Issue 15: RAM was assumed to be 2x GPU memory; unknown is now unknown (offload plans then need --cpu-ram)."""
    assert parse_gpus("8xA100-80GB").cpu_ram() is None
    assert parse_gpus("1x24GB", cpu_ram_bytes=parse_memory("512GB")).cpu_ram() == 512 * GiB
    assert parse_memory("1.5TB") == int(1.5 * 1024 ** 4)


def test_detection_without_cuda_is_none():
    import torch
    if torch.cuda.is_available():
        hw = detect_hardware()
        assert hw is not None and hw.gpu.memory_bytes == torch.cuda.get_device_properties(0).total_memory
    else:
        assert detect_hardware() is None
