"""The finished tiny training run that evaluate's tests score (built by the export tests' fixture, shared here)."""

from export.conftest import tiny_run  # noqa: F401  (pytest finds fixtures by name in this module)
