"""`plan: auto` holds the run to the budget it planned for.

The planner chooses a setup whose predicted peak fits the usable budget (GPU memory minus plan.margin). torch's
caching allocator can still reserve far more than is allocated when tensor sizes vary from step to step: on one
H200, auto on packed Spider allocated 83.0 GiB at peak (83 predicted) and reserved 127.8 GiB, past the 125.8 GiB
usable (docs/planner.md). Capping the process at the usable budget makes the allocator return cached blocks to the
device and retry before it goes past it, so the margin the user asked to keep free stays free. The limit only
binds cache: allocations themselves stay far below it in a setup the planner chose.
"""

from __future__ import annotations

import torch

GiB = 2 ** 30


def hold_to_budget(usable_bytes: int, device: torch.device) -> str:
    """Cap this process's CUDA memory (allocated + cached) at `usable_bytes`; returns the line the run prints."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, max(usable_bytes, 0) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return (f"plan: this process may hold {fraction * total / GiB:.1f} of the GPU's {total / GiB:.1f} GiB "
            "(plan.margin kept free; torch releases cached blocks before passing it)")
