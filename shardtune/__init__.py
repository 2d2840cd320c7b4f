"""shardtune: plan, train and export LoRA / QLoRA / full fine-tunes of Hugging Face causal LMs."""

__version__ = "0.1.0"
