"""What shardtune ships instead of downloading: the tiny model and its tokenizer (its pretrained base lives in
shardtune/assets/tiny-llama, built by pretrain_base.py from copy_corpus.py's lines), the toy text-to-SQL set, and the
chat templates. Sits below both `model/` and `data/` and imports neither (only the standard library, torch and
transformers), so both can use it without importing each other."""
