"""Every bad input gets one line: a table of bad inputs (config values, YAML files, data files, model directories,
checkpoints, DeepSpeed JSONs, output locations, launch options), each run through the real CLI in-process.

Each case asserts: the exit code (2, or the documented one), at most 3 non-empty lines on stderr and no traceback
(without --debug), one line naming the thing at fault and the fix, and every file that existed before (under the
case's tmp dir and the shared tiny model and data) unchanged, with no new file except those the case may create.
Signals and preemption are covered in test_resume_exact.py; guards against divergence in test_guards.py.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from shardtune.cli import main
from support import alpaca_records, run_overrides

MAX_STDERR_LINES = 3
# a lora run (no 4-bit quantisation: fast on CPU) that reaches data, model and engine set-up in about a second
FAST = {"train.method": "lora", "train.max_steps": 4, "train.log_every": 1, "train.micro_batch_size": 4}


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file under `roots`: sha256 and mtime. 'Nothing changed on disk' means two snapshots are equal."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in files:
            if p.is_file() and not p.is_symlink():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@dataclass
class Ctx:
    """What a case builds its bad input from: its own tmp dir, the session's tiny Llama and alpaca file (read-only:
    a case that needs a changed model copies it first) and, on request, a finished run with checkpoints."""
    tmp: Path
    model: Path
    data: Path
    finished: Callable[[], Path]

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def train(self, extra: dict | None = None, *, model: Path | None = None, data: Path | None = None,
              out: Path | None = None, flags: tuple[str, ...] = ()) -> list[str]:
        over = run_overrides(model or self.model, data or self.data, out or self.out, **{**FAST, **(extra or {})})
        return ["train", *flags, *over]

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        return p

    def jsonl(self, name: str, records: list) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in records))

    def model_copy(self, drop: tuple[str, ...] = ()) -> Path:
        """The tiny model copied to <tmp>/model, without the files matching `drop`."""
        d = self.tmp / "model"
        shutil.copytree(self.model, d)
        for pattern in drop:
            for p in d.glob(pattern):
                p.unlink()
        return d

    def raw_model(self, config: dict | str) -> Path:
        """A directory holding only a config.json (no weights needed: the checks run before any weight is read)."""
        d = self.tmp / "raw-model"
        d.mkdir()
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return d

    def finished_run(self) -> Path:
        """A copy of a finished 4-step run (checkpoints at steps 2 and 4, adapter, metrics) at self.out."""
        shutil.copytree(self.finished(), self.out)
        return self.out

    def yaml(self, text: str) -> str:
        return str(self.write("cfg.yaml", text))


@dataclass(frozen=True)
class Case:
    argv: Callable[[Ctx], list[str]]
    names: tuple[str, ...]        # the key, file or value at fault, as the message must name it (<tmp>: the dir)
    fixes: tuple[str, ...]        # what the message tells the user to do
    rc: int = 2
    creates: tuple[str, ...] = ()  # globs (relative to tmp) of files the case may create or change
    stream: str = "err"           # where the line is printed: err, or out for lines of a run that goes on


def case(id_: str, argv, names, fixes, *, xfail: str | None = None, skip: str | None = None, **kw):
    marks = []
    if xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=xfail))
    if skip:
        marks.append(pytest.mark.skipif(True, reason=skip))
    as_tuple = (lambda v: (v,) if isinstance(v, str) else tuple(v))
    return pytest.param(Case(argv, as_tuple(names), as_tuple(fixes), **kw), id=id_, marks=marks)


def _records_without_needed_keys():
    return [{"question": "q", "answer": "a", "id": i} for i in range(8)]


def _corrupt_jsonl(c: Ctx) -> Path:
    lines = [json.dumps(r) for r in alpaca_records(6)]
    lines[2] = lines[2][:-7]  # line 3 loses its closing characters
    return c.write("data/broken.jsonl", "\n".join(lines) + "\n")


def _ds(c: Ctx, content) -> str:
    return str(c.write("ds.json", content if isinstance(content, str) else json.dumps(content)))


def _truncate(path: Path, keep: int = 16) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _resume_changing(extra: dict) -> Callable[[Ctx], list[str]]:
    """Resume the finished run with `extra` changed."""
    def argv(c: Ctx) -> list[str]:
        c.finished_run()
        return c.train({"train.resume": True, "train.save_every": 2, **extra})
    return argv


def _rerun_into_finished(c: Ctx) -> list[str]:
    c.finished_run()
    return c.train()


def _truncated_checkpoint_resume(c: Ctx) -> list[str]:
    out = c.finished_run()
    _truncate(out / "checkpoints" / "step-000004" / "trainer-rank00000.safetensors")
    return c.train({"train.resume": True, "train.save_every": 2})


def _pickled_checkpoint_resume(c: Ctx) -> list[str]:
    """A checkpoint written in the pickle format (format 1) is refused, never loaded."""
    out = c.finished_run()
    marker = out / "checkpoints" / "step-000004" / "COMPLETE"
    m = json.loads(marker.read_text())
    m["format"] = 1
    marker.write_text(json.dumps(m))
    return c.train({"train.resume": True, "train.save_every": 2})


def _output_is_a_file(c: Ctx) -> list[str]:
    f = c.write("out-file", "mine")
    return c.train(out=f)


def _output_under_a_file(c: Ctx) -> list[str]:
    f = c.write("a-file", "mine")
    return c.train(out=f / "run")


def _read_only_parent(c: Ctx) -> list[str]:
    """output.dir inside a directory this process may not write: a 0o500 directory, or for root (whom permissions
    do not stop) a read-only file system."""
    if not _is_root():
        ro = c.tmp / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        return c.train(out=ro / "run")
    return c.train(out=Path(_read_only_location()) / "run")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _read_only_location() -> str | None:
    """A directory root cannot create entries in (sysfs refuses mkdir), or None."""
    probe = Path("/sys/shardtune-bad-inputs-probe")
    try:
        probe.mkdir()
    except OSError:
        return str(probe.parent)
    probe.rmdir()
    return None


def _partial_run(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return c.train()


def _gpus_visible() -> bool:
    from shardtune.parallel.launch import _visible_gpus
    return _visible_gpus() > 0


def _nproc_over_cpus(c: Ctx) -> list[str]:
    return c.train({"train.max_steps": 1}, flags=("--nproc", str((os.cpu_count() or 1) * 4)))


CASES = [
    # ------------------------------------------------------------------ config values (key=value overrides)
    case("max_steps-negative", lambda c: c.train({"train.max_steps": -1}), ("train.max_steps", "-1"), ">= 0"),
    case("warmup_steps-negative", lambda c: c.train({"train.warmup_steps": -3}), ("train.warmup_steps", "-3"), ">= 0"),
    case("log_every-zero", lambda c: c.train({"train.log_every": 0}), ("train.log_every", "0"), ">= 1"),
    case("micro_batch_size-zero", lambda c: c.train({"train.micro_batch_size": 0}), "train.micro_batch_size", ">= 1"),
    case("grad_accum-zero", lambda c: c.train({"train.grad_accum": 0}), "train.grad_accum", ">= 1"),
    case("lr-zero", lambda c: c.train({"train.lr": 0}), "train.lr", "> 0"),
    case("lr-negative", lambda c: c.train({"train.lr": -1e-4}), ("train.lr", "-0.0001"), "> 0"),
    case("lora-rank-zero", lambda c: c.train({"lora.rank": 0}), "lora.rank", ">= 1"),
    case("lora-alpha-zero", lambda c: c.train({"lora.alpha": 0}), "lora.alpha", "> 0"),
    case("lora-dropout-1.5", lambda c: c.train({"lora.dropout": 1.5}), ("lora.dropout", "1.5"), "[0, 1)"),
    case("max_bad_steps-zero", lambda c: c.train({"train.max_bad_steps": 0}), "train.max_bad_steps", ">= 1"),
    case("grad_clip-negative", lambda c: c.train({"train.grad_clip": -1}), "train.grad_clip", "0 disables"),
    case("save_every-negative", lambda c: c.train({"train.save_every": -2}), "train.save_every", ">= 0"),
    case("max_seq_len-zero", lambda c: c.train({"data.max_seq_len": 0}), "data.max_seq_len", ">= 1"),
    case("val_fraction-one", lambda c: c.train({"data.val_fraction": 1.0}), "data.val_fraction", "[0, 1)"),
    case("plan-margin-1.5", lambda c: c.train({"plan.margin": 1.5}), "plan.margin", "[0, 1)"),
    case("steps-and-epochs-zero", lambda c: c.train({"train.max_steps": 0, "train.epochs": 0}),
         ("train.max_steps", "train.epochs"), "train.max_steps=60"),
    case("unknown-key-did-you-mean", lambda c: c.train({"lora.rnak": 3}), "'lora.rnak'", "did you mean 'lora.rank'"),
    case("unknown-section", lambda c: c.train({"trian.lr": 1e-4}), "'trian", "train"),
    case("unknown-bare-key", lambda c: c.train({"frobnicate": 1}), "'frobnicate'", "shardtune config keys"),
    case("int-key-given-abc", lambda c: c.train({"train.max_steps": "abc"}), ("train.max_steps", "'abc'"), "int"),
    case("float-key-given-text", lambda c: c.train({"train.lr": "fast"}), ("train.lr", "'fast'"), "float"),
    case("bool-key-given-maybe", lambda c: c.train({"train.resume": "maybe"}), ("train.resume", "'maybe'"), "bool"),
    case("method-unknown", lambda c: c.train({"train.method": "sft"}), ("train.method", "'sft'"), "qlora"),
    case("precision-unknown", lambda c: c.train({"train.precision": "fp8"}), ("train.precision", "'fp8'"), "bf16"),
    case("strategy-unknown", lambda c: c.train({"parallel.strategy": "zero"}), ("parallel.strategy", "'zero'"),
         "fsdp"),
    case("zero_stage-1", lambda c: c.train({"parallel.zero_stage": 1}), ("parallel.zero_stage", "1"), "2 | 3"),
    case("data-format-unknown", lambda c: c.train({"data.format": "csv"}), ("data.format", "'csv'"), "alpaca"),
    case("report_to-unknown", lambda c: c.train({"output.report_to": "slack"}), ("output.report_to", "slack"),
         "tensorboard"),
    case("max_samples-zero", lambda c: c.train({"data.max_samples": 0}), "data.max_samples", ">= 1"),
    case("on_bad_line-unknown", lambda c: c.train({"data.on_bad_line": "ignore"}), ("data.on_bad_line", "'ignore'"),
         "skip"),
    case("optimizer-8bit-on-cpu", lambda c: c.train({"train.optimizer": "adamw_8bit"}), "train.optimizer",
         "train.optimizer=adamw"),
    case("precision-bf16-on-cpu", lambda c: c.train({"train.precision": "bf16"}), "bf16", "train.precision=fp32"),
    case("lora-target-modules-absent", lambda c: c.train({"lora.target_modules": "wq,wk"}),
         ("lora.target_modules", "wq"), ("q_proj", "lora.target_modules=all-linear")),
    case("section-set-to-a-value", lambda c: c.train({"train": 3}), "'train'", "e.g. train.lr"),
    case("stray-item-after-the-yaml", lambda c: ["train", c.yaml("train:\n  lr: 1e-4\n"), "lr", f"output.dir={c.out}"],
         "'lr'", "key=value"),
    # ------------------------------------------------------------------ YAML config files
    case("yaml-syntax-error", lambda c: ["train", c.yaml("train:\n  lr: 1e-4\n  method: [lora\n"),
                                         f"output.dir={c.out}"], "cfg.yaml:", "not valid YAML"),
    case("yaml-top-level-list", lambda c: ["train", c.yaml("- train\n- lr\n"), f"output.dir={c.out}"],
         "cfg.yaml", "mapping of sections"),
    case("yaml-top-level-scalar", lambda c: ["train", c.yaml("just some text\n"), f"output.dir={c.out}"],
         "cfg.yaml", "mapping of sections"),
    case("yaml-missing-file", lambda c: ["train", str(c.tmp / "absent.yaml"), f"output.dir={c.out}"],
         "absent.yaml", "not found"),
    case("yaml-empty-file", lambda c: ["train", c.yaml(""), f"output.dir={c.out}"], "cfg.yaml", "empty"),
    case("yaml-is-a-directory", lambda c: ["train", str(c.write("conf.d/x", "").parent), f"output.dir={c.out}"],
         "conf.d", "is a directory"),
    case("yaml-not-utf8", lambda c: ["train", str(c.write("cfg.yaml", b"train:\n  lr: \xff\xfe\x00\n")),
                                     f"output.dir={c.out}"], "cfg.yaml", "UTF-8"),
    case("yaml-section-is-a-list", lambda c: ["train", c.yaml("train: [1, 2]\n"), f"output.dir={c.out}"],
         "train", "mapping"),
    case("yaml-python-object-tag", lambda c: ["train", c.yaml("train: !!python/object/apply:os.system ['true']\n"),
                                              f"output.dir={c.out}"], "cfg.yaml", "not valid YAML"),
    case("yaml-value-of-wrong-type", lambda c: ["train", c.yaml("lora:\n  rank: eight\n"), f"output.dir={c.out}"],
         ("lora.rank", "'eight'"), "int"),
    case("yaml-unknown-key", lambda c: ["train", c.yaml("train:\n  learning_rat: 1e-4\n"), f"output.dir={c.out}"],
         "train.learning_rat", "train.lr"),
    # ------------------------------------------------------------------ data files
    case("data-missing", lambda c: c.train(data=c.tmp / "nope.jsonl"), "nope.jsonl", "not found"),
    case("data-empty", lambda c: c.train(data=c.write("empty.jsonl", "")), "empty.jsonl", "add records"),
    case("data-corrupt-jsonl-line", lambda c: c.train(data=_corrupt_jsonl(c)), "broken.jsonl:3",
         "data.on_bad_line=skip"),
    case("data-unknown-extension", lambda c: c.train(data=c.write("train.txt", "hello\n")), ".txt", ".jsonl"),
    case("data-records-missing-keys", lambda c: c.train(data=c.jsonl("qa.jsonl", _records_without_needed_keys())),
         ("qa.jsonl", "question"), "data.format"),
    case("data-alpaca-without-output", lambda c: c.train(
        {"data.format": "alpaca"}, data=c.jsonl("a.jsonl", [{"instruction": "x"}] * 8)), ("a.jsonl", "output"),
         "data.on_bad_line=skip"),
    case("data-csv-without-header", lambda c: c.train(
        data=c.write("rows.csv", "How many singers?,SELECT count(*) FROM singer\nList names,SELECT name FROM t\n")),
         "rows.csv", "data.format"),
    case("data-binary-garbage", lambda c: c.train(data=c.write("junk.jsonl", bytes(range(256)) * 8)),
         "junk.jsonl", "UTF-8"),
    case("data-parquet-garbage", lambda c: c.train(data=c.write("junk.parquet", b"not parquet at all" * 20)),
         "junk.parquet", "check the file's format"),
    case("data-is-a-directory", lambda c: c.train(data=c.write("dset/x.jsonl", "").parent), "dset",
         "pass one .json"),
    case("data-json-array-broken", lambda c: c.train(data=c.write("arr.json", '[{"instruction": "a",\n "output": }]')),
         "arr.json:2", "JSON"),
    case("data-jsonl-line-not-object", lambda c: c.train(data=c.write("l.jsonl", "[1, 2]\n" * 4)), "l.jsonl:1",
         "data.on_bad_line=skip"),
    case("data-every-sample-too-long", lambda c: c.train({"data.max_seq_len": 4}), "data.max_seq_len",
         "raise data.max_seq_len"),
    case("data-val_path-missing", lambda c: c.train({"data.val_path": c.tmp / "val.jsonl"}),
         ("data.val_path", "val.jsonl"), "not found"),
    case("data-builtin-unknown", lambda c: c.train(data="builtin:nope"), "builtin:nope", "builtin:toy-sql"),
    case("data-chat_template-unknown", lambda c: c.train({"data.chat_template": "vicuna9"}), "vicuna9", "chatml"),
    # ------------------------------------------------------------------ model directories
    case("model-dir-missing", lambda c: c.train(model=c.tmp / "no-model"), "no-model", "local model directory"),
    case("model-path-is-a-file", lambda c: c.train(model=c.write("weights.bin", b"x")), "weights.bin",
         "model's directory"),
    case("model-no-config-json", lambda c: c.train(model=c.model_copy(drop=("config.json",))), "config.json",
         "Hugging Face model directory"),
    case("model-config-not-json", lambda c: c.train(model=c.raw_model("{not json")), "config.json", "re-download"),
    case("model-config-without-model_type", lambda c: c.train(model=c.raw_model({"hidden_size": 8})),
         "model_type", "Hugging Face"),
    case("model-unknown-model_type", lambda c: c.train(model=c.raw_model({"model_type": "foolm"})), "'foolm'",
         "decoder-only"),
    case("model-bert-not-causal", lambda c: c.train(model=c.raw_model(
        {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100})), "'bert'", "decoder-only"),
    case("model-remote-code-without-flag", lambda c: c.train(model=c.raw_model(
        {"model_type": "mylm", "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}})),
         "'mylm'", "model.trust_remote_code=true"),
    case("model-prequantized-gptq", lambda c: c.train(model=c.raw_model(
        {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}})), "pre-quantized GPTQ",
         "original bf16"),
    case("model-truncated-safetensors", lambda c: c.train(model=_truncated_weights(c)),
         ("<tmp>/model/model.safetensors", "truncated"), "re-download"),
    case("model-no-weights", lambda c: c.train(model=c.model_copy(drop=("*.safetensors",))),
         ("<tmp>/model", "no weight files"), "model.random_init=true"),
    case("model-missing-tokenizer", lambda c: c.train(model=c.model_copy(
        drop=("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt"))), "<tmp>/model",
         "tokenizer files"),
    case("model-builtin-unknown", lambda c: c.train(model="builtin:gpt5"), "builtin:gpt5", "builtin:tiny-llama"),
    # ------------------------------------------------------------------ checkpoints and resume
    case("resume-truncated-checkpoint-is-skipped", _truncated_checkpoint_resume,
         ("resume: skipping", "step-000004", "trainer-rank00000.safetensors"), "continuing from", rc=0,
         creates=("out/*", "out/**/*"), stream="out"),
    case("resume-pickle-format-checkpoint-is-skipped", _pickled_checkpoint_resume,
         ("resume: skipping", "step-000004", "pickle"), "continuing from", rc=0, creates=("out/*", "out/**/*"),
         stream="out"),
    case("resume-changed-lora-rank", _resume_changing({"lora.rank": 4}), "lora.rank: 8 -> 4", "output.overwrite=true"),
    case("resume-changed-method", _resume_changing({"train.method": "full"}), "train.method: 'lora' -> 'full'",
         "restore them"),
    case("resume-changed-lr-and-targets", _resume_changing({"train.lr": 1e-4, "lora.target_modules": "q_proj"}),
         ("train.lr: 0.003 -> 0.0001", "lora.target_modules: 'all-linear' -> ['q_proj']"), "restore them"),
    # ------------------------------------------------------------------ DeepSpeed JSONs
    case("ds-json-not-json", lambda c: c.train({"parallel.deepspeed_config": _ds(c, "{zero: 3")}),
         ("ds.json", "line 1"), "fix the file"),
    case("ds-json-a-list", lambda c: c.train({"parallel.deepspeed_config": _ds(c, [1, 2])}), "ds.json",
         "JSON object"),
    case("ds-json-missing", lambda c: c.train({"parallel.deepspeed_config": c.tmp / "nods.json"}), "nods.json",
         "not found"),
    case("ds-json-micro-batch-conflict", lambda c: c.train({"parallel.deepspeed_config": _ds(
        c, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})}),
         ("train_micro_batch_size_per_gpu", "train.micro_batch_size"), "make"),
    case("ds-json-unknown-stage", lambda c: c.train({"parallel.deepspeed_config": _ds(
        c, {"zero_optimization": {"stage": 5}})}), "zero_optimization.stage=5", "use 2 or 3"),
    case("ds-json-fp16-vs-fp32", lambda c: c.train({"train.precision": "fp32", "parallel.deepspeed_config": _ds(
        c, {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}})}), ("fp16.enabled=true", "train.precision"),
         "ds.json"),
    case("ds-json-empty", lambda c: c.train({"parallel.deepspeed_config": _ds(c, "")}), "ds.json", "not valid JSON"),
    case("ds-json-zero-section-not-object", lambda c: c.train({"parallel.deepspeed_config": _ds(
        c, {"zero_optimization": 3})}), ("zero_optimization", "ds.json"), "object"),
    case("ds-json-optimizer-not-object", lambda c: c.train({"parallel.deepspeed_config": _ds(
        c, {"optimizer": "AdamW", "zero_optimization": {"stage": 2}})}), ("optimizer", "ds.json"), "object"),
    case("ds-json-param-offload-on-stage-2", lambda c: c.train({"parallel.deepspeed_config": _ds(
        c, {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})}), "offload_param", "stage 3"),
    case("ds-json-auto-without-a-value", lambda c: c.train({"parallel.deepspeed_config": _ds(
        c, {"steps_per_print": "auto", "zero_optimization": {"stage": 2}})}), "steps_per_print", "give a number"),
    # ------------------------------------------------------------------ output locations
    case("output-dir-is-a-file", _output_is_a_file, "out-file", "choose a writable output.dir"),
    case("output-dir-under-a-file", _output_under_a_file, "a-file", "choose a writable output.dir"),
    case("output-dir-read-only", _read_only_parent, "/run", "choose a writable output.dir",
         skip="running as root, where chmod 0o500 does not stop writes, and /sys is writable here"
         if _is_root() and _read_only_location() is None else None),
    case("output-dir-holds-finished-run", _rerun_into_finished, "already holds a run",
         ("train.resume=true", "output.overwrite=true")),
    case("output-dir-holds-partial-run", _partial_run, ("already holds a run", "metrics.jsonl"), "train.resume=true"),
    # ------------------------------------------------------------------ launch options
    case("nproc-zero", lambda c: c.train({"train.max_steps": 1}, flags=("--nproc", "0")), "--nproc 0", ">= 1"),
    case("nproc-not-a-number", lambda c: c.train(flags=("--nproc", "two")), ("--nproc", "'two'"), "--help"),
    case("nproc-over-cpu-count", _nproc_over_cpus, ("--nproc", "cores"), "or fewer",
         skip="GPUs are visible: --nproc is checked against them" if _gpus_visible() else None),
    case("node-rank-outside-nnodes", lambda c: c.train(flags=("--nnodes", "2", "--node-rank", "2")),
         "--node-rank 2", "0..1"),
    case("node-rank-negative", lambda c: c.train(flags=("--nnodes", "2", "--node-rank", "-1")), "--node-rank -1",
         "0..1"),
    case("master-port-not-a-number", lambda c: c.train(flags=("--master-port", "http")), ("--master-port", "'http'"),
         "--help"),
    case("nnodes-zero", lambda c: c.train({"train.max_steps": 1}, flags=("--nnodes", "0")), "--nnodes 0", ">= 1"),
    case("other-trainers-option", lambda c: c.train(flags=("--max_steps", "10")), "--max_steps",
         "train.max_steps=10"),
    case("unknown-command", lambda c: ["trian", f"output.dir={c.out}"], "trian", "train"),
]


def _truncated_weights(c: Ctx) -> Path:
    d = c.model_copy()
    _truncate(d / "model.safetensors", keep=(d / "model.safetensors").stat().st_size // 2)
    return d


@pytest.fixture(scope="module")
def finished_run(tiny_model, alpaca_file, tmp_path_factory):
    """One finished 4-step lora run with checkpoints at steps 2 and 4, trained once for the module, built lazily."""
    made: list[Path] = []

    def get() -> Path:
        if not made:
            out = tmp_path_factory.mktemp("finished") / "run"
            argv = run_overrides(tiny_model("llama"), alpaca_file, out, **{**FAST, "train.save_every": 2})
            assert main(["train", *argv]) == 0
            made.append(out)
        return made[0]
    return get


@pytest.fixture
def ctx(tmp_path, tiny_model, alpaca_file, finished_run, monkeypatch):
    """A case's context; what a case may leave in the process (launcher variables a DeepSpeed set-up exports, a
    process group) is undone after it, so that the next case sees a fresh `shardtune` process."""
    import torch.distributed as tdist

    import shardtune.parallel.supervise as supervise
    monkeypatch.chdir(tmp_path)  # a stray relative path lands in tmp, where the snapshot sees it
    # a launch option the CLI failed to refuse must not start ranks on a shared 2-core machine: the launch itself
    # answers "success", which fails the case's exit-code check
    monkeypatch.setattr(supervise, "supervise", lambda *a, **kw: 0)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # left by earlier one-process engine tests
        os.environ.pop(k, None)
    yield Ctx(tmp_path, tiny_model("llama"), alpaca_file, finished_run)
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def test_the_table_has_at_least_60_distinct_cases():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_gets_one_line(bad: Case, ctx: Ctx, capfd):
    argv = bad.argv(ctx)
    roots = (ctx.tmp, ctx.model, ctx.data)
    before = snapshot(*roots)
    capfd.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except Exception as e:  # what the CLI lets through prints a traceback in a real process
        rc = f"{type(e).__name__} raised: {e}"
    out, err = capfd.readouterr()
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err + out, err
    assert len(err_lines) <= MAX_STDERR_LINES, err
    assert rc == bad.rc, f"exit {rc}, expected {bad.rc}: {err}"
    if bad.stream == "err":  # the one error line names the thing and the fix
        needles, lines = [n.replace("<tmp>", str(ctx.tmp)) for n in bad.names + bad.fixes], err_lines
    else:  # a run that goes on: one line names what happened, the fix (what the run did instead) may follow
        needles, lines = [n.replace("<tmp>", str(ctx.tmp)) for n in bad.names], out.splitlines()
        assert all(f in out for f in bad.fixes), out
    assert any(all(n in ln for n in needles) for ln in lines), f"no line holds all of {needles}:\n{err or out}"
    after = snapshot(*roots)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    allowed = [k for k in changed if any(fnmatch.fnmatch(os.path.relpath(k, ctx.tmp), g) for g in bad.creates)]
    assert [k for k in changed if k not in allowed] == [], "files changed or appeared on disk"
