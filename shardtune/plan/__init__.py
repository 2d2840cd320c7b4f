"""The planner: per-GPU / CPU memory and speed of a training setup from the model's config.json alone, and the
search for the fastest setup that fits. Importing it does not import torch (`shardtune plan` is instant).

Library entry points: `estimate(cfg, hw) -> Estimate` and `auto_plan(cfg, hw) -> SearchResult`.
"""

from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.estimate import Estimate, estimate, estimate_setup
from shardtune.plan.search import SearchResult, auto_plan, smallest_change
from shardtune.plan.setup import TrainSetup, apply_setup, setup_from_config

__all__ = ["DEFAULT_CONSTANTS", "Estimate", "PlanConstants", "SearchResult", "TrainSetup", "apply_setup",
           "auto_plan", "estimate", "estimate_setup", "setup_from_config", "smallest_change"]
