"""`shardtune plan` on a `.gguf` file (issue 18): the shape comes from the file's header and tensor table, agrees
with transformers' own GGUF reader and with the file's tensors, plans like the same model given as a directory, and
a missing `gguf` package is the same one-line error as training's."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from shardtune.errors import EnvironmentProblem, ModelError  # noqa: E402
from shardtune.model.shapes import shape_from_config  # noqa: E402
from shardtune.plan import command  # noqa: E402
from shardtune.plan.gguf_shape import gguf_config, plan_shape  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_gguf import write_tiny_gguf  # noqa: E402  the training tests' tiny llama GGUF (tied, one Q8_0 tensor)

REPO = Path(__file__).resolve().parents[2]


def write_qwen2_gguf(path: Path, vocab=300, hidden=64, layers=3, heads=4, kv_heads=2, ffn=160) -> None:
    """A qwen2 GGUF: q/k/v biases, an untied output matrix, Q8_0 blocks; random values (only shapes matter)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_block_count(layers)
    w.add_context_length(1024)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_vocab_size(vocab)   # real files carry a token list; transformers reads the size from either
    kv = hidden // heads * kv_heads

    def put(name, shape, quant=False):
        arr = rng.standard_normal(shape).astype(np.float32)
        if quant:
            packed = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        put(f"blk.{i}.attn_norm.weight", (hidden,))
        for n, rows in (("q", hidden), ("k", kv), ("v", kv)):
            put(f"blk.{i}.attn_{n}.weight", (rows, hidden), quant=True)
            put(f"blk.{i}.attn_{n}.bias", (rows,))
        put(f"blk.{i}.attn_output.weight", (hidden, hidden), quant=True)
        put(f"blk.{i}.ffn_norm.weight", (hidden,))
        put(f"blk.{i}.ffn_gate.weight", (ffn, hidden), quant=True)
        put(f"blk.{i}.ffn_up.weight", (ffn, hidden), quant=True)
        put(f"blk.{i}.ffn_down.weight", (hidden, ffn), quant=True)
    put("output_norm.weight", (hidden,))
    put("output.weight", (vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture()
def files(tmp_path):
    llama, qwen = tmp_path / "tiny-llama.Q8_0.gguf", tmp_path / "tiny-qwen2.Q8_0.gguf"
    write_tiny_gguf(llama)
    write_qwen2_gguf(qwen)
    return {"llama": llama, "qwen2": qwen}


def _file_params(path: Path) -> int:
    return sum(int(t.n_elements) for t in gguf.GGUFReader(str(path), "r").tensors)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shape_agrees_with_transformers_reader_and_the_files_tensors(files, arch):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    path = files[arch]
    ours = shape_from_config(gguf_config(path), name=path.name)
    theirs = shape_from_config(load_gguf_checkpoint(str(path))["config"], name=path.name)
    for field in ("model_type", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                  "tied_embeddings", "max_position"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.params_total == _file_params(path)   # every tensor of the file, counted once (tied head included)
    assert ours.tied_embeddings is (arch == "llama")
    assert all(lin.bias == (arch == "qwen2") for lin in ours.linears if lin.role in "qkv")


def _plan(argv, capsys):
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    rc = command.run(p.parse_args(argv))
    return rc, json.loads(capsys.readouterr().out)


def test_plan_a_gguf_file_like_the_same_model_as_a_config(files, tmp_path, capsys):
    args = ["--gpus", "1xRTX4090", "--method", "qlora", "--seq", "256", "--micro-batch", "2", "--json"]
    rc, d = _plan(["--model", str(files["qwen2"]), *args], capsys)
    assert rc == 0 and d["model"]["name"] == "tiny-qwen2.Q8_0.gguf" and d["memory"]["peak_reserved"] > 0
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(gguf_config(files["qwen2"])))
    rc2, d2 = _plan(["--model", str(cfg_file), *args], capsys)
    assert rc2 == 0 and d2["memory"]["gpu"] == d["memory"]["gpu"]
    # a directory plus model.gguf_file, as training accepts it
    rc3, d3 = _plan(["--model", str(tmp_path), f"model.gguf_file={files['qwen2'].name}", *args], capsys)
    assert rc3 == 0 and d3["memory"]["gpu"] == d["memory"]["gpu"]
    rc4, d4 = _plan(["--model", str(files["qwen2"]), "--gpus", "1xRTX4090", "--seq", "256", "--auto", "--json"],
                    capsys)   # the search reads the same header
    assert rc4 == 0 and d4["auto"]["found"] and d4["model"]["name"] == "tiny-qwen2.Q8_0.gguf"


def test_gguf_errors(files, tmp_path, monkeypatch):
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(ModelError, match="broken.gguf' is unreadable"):
        gguf_config(not_gguf)
    with pytest.raises(ModelError, match="does not exist"):
        plan_shape(argparse.Namespace(name_or_path=str(tmp_path / "missing.gguf"), gguf_file=None))
    monkeypatch.setitem(sys.modules, "gguf", None)   # as if the extra was not installed
    with pytest.raises(EnvironmentProblem, match=r"needs the gguf package; pip install 'shardtune\[gguf\]'"):
        plan_shape(argparse.Namespace(name_or_path=str(files["llama"]), gguf_file=None))


def test_cli_without_gguf_package_is_trainings_one_line_error(files, tmp_path):
    blocker = tmp_path / "no_gguf" / "gguf"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named gguf')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])}
    r = subprocess.run([sys.executable, "-m", "shardtune.cli", "plan", "--model", str(files["llama"]), "--gpus",
                        "1xH100"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr + r.stdout
    from shardtune.model.gguf import _INSTALL
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: reading a .gguf model needs the gguf package; {_INSTALL}"], r.stderr


def test_reading_the_header_imports_neither_torch_nor_transformers(files):
    code = ("import sys; from pathlib import Path; from shardtune.plan.gguf_shape import plan_shape; "
            "from types import SimpleNamespace as N; "
            f"s = plan_shape(N(name_or_path={str(files['qwen2'])!r}, gguf_file=None)); "
            "assert s.layers == 3, s; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
