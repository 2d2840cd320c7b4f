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
    try:
        import torch
        if not torch.cuda.is_available():
            # DeepSpeed otherwise warns on import that it fell back to the CPU accelerator.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    for mod in ("torch.jit", "torch.utils.checkpoint", "peft", "transformers", "bitsandbytes", "accelerate"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=mod)
        warnings.filterwarnings("ignore", category=FutureWarning, module=mod)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
