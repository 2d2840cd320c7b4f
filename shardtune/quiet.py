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
    # Third-party warnings are for their developers (e.g. ~33 torch.distributed FutureWarnings per DeepSpeed run, a
    # bitsandbytes autograd UserWarning): all hidden, shardtune's own kept; --debug shows everything. The ranks of
    # --nproc run this same function; PYTHONWARNINGS covers processes started without it.
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="shardtune")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    # bitsandbytes logs a warning per process when its optional CPU kernels package is missing; liger-kernel logs an
    # ImportError line per optional backend it probes
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "accelerate", "bitsandbytes",
                 "liger_kernel"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers and datasets read TRANSFORMERS_VERBOSITY / HF_DATASETS_DISABLE_PROGRESS_BARS when imported;
    # transformers' weight-loading bar also follows HF_HUB_DISABLE_PROGRESS_BARS.
