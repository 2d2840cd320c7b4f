"""Text-to-SQL scoring: SQL text (normalize.py), databases synthesized from schemas (synth.py), a read-only sandbox
for every statement evaluate runs (sandbox.py), result comparison (execute.py) and per-record scoring (score.py)."""
