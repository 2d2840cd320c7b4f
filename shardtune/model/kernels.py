"""Optional fused kernels (Liger: RMSNorm, RoPE, SwiGLU) patched into a model instance on CUDA.

Nothing here is required: without CUDA or without liger-kernel the model keeps transformers' own modules, and the
return value says which path is active so the run can report it.
"""

from __future__ import annotations


def apply_kernels(model, mode: str, device) -> str:
    """mode: auto (Liger when CUDA and installed) | liger (required) | none. Returns 'liger' or 'none'."""
    from shardtune.errors import EnvironmentProblem
    if mode == "none":
        return "none"
    if device.type != "cuda":
        if mode == "liger":
            raise EnvironmentProblem("train.kernels=liger needs CUDA; use train.kernels=auto or none on CPU")
        return "none"
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except Exception:
        if mode == "liger":
            raise EnvironmentProblem("train.kernels=liger but liger-kernel is not installed; pip install liger-kernel")
        return "none"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the loss is fused by shardtune itself (train/loss.py); only the per-layer kernels are patched here
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return "liger"
