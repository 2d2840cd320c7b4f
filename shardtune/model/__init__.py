"""The model side: shapes from config.json (shapes.py), the one-process load (load.py), quantization, kernels, and
the streamed loader split by concern (checkpoint, random_weights, skeleton, checkpoint_names, materialize,
memory_monitor, load_report; stream.py is the one call). Imports nothing from data/ or parallel/."""
