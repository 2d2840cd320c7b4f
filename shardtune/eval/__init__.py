"""Evaluation of trained adapters: the `shardtune evaluate` command (evaluate.py), generic loss / exact match
(generic.py) and text-to-SQL scoring (text2sql/)."""
