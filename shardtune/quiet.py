"""Keep library chatter (progress bars, deprecation warnings, accelerator probes) out of shardtune's output."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries(debug: bool = False) -> None:
    if debug:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not os.path.exists("/dev/nvidiactl"):
        # no NVIDIA driver: DeepSpeed would otherwise warn on import that it fell back to the CPU accelerator
        # (checked without importing torch, so `shardtune plan` stays instant)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for mod in ("torch.jit", "torch.utils.checkpoint", "peft", "transformers", "bitsandbytes", "accelerate"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=mod)
        warnings.filterwarnings("ignore", category=FutureWarning, module=mod)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # bitsandbytes logs a warning per process when its optional CPU kernels package is missing; liger-kernel logs an
    # ImportError line per optional backend it probes
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "accelerate", "bitsandbytes",
                 "liger_kernel"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers and datasets read TRANSFORMERS_VERBOSITY / HF_DATASETS_DISABLE_PROGRESS_BARS when imported;
    # transformers' weight-loading bar also follows HF_HUB_DISABLE_PROGRESS_BARS.
