"""Reading files: every way a data file can be wrong gives one line naming the file (and line) and the fix; skip mode
warns and counts; CSV/Parquet/JSON/JSONL all load; splits, limits and truncation behave as documented."""

from __future__ import annotations

import json
import os

import pytest
from data_helpers import data_cfg, target_text, write_jsonl

from shardtune.data.pipeline import MAX_BAD_LINE_WARNINGS, build_datasets
from shardtune.errors import DataError

GOOD = [{"instruction": f"What is two plus {i}?", "output": f"The answer is {i + 2}."} for i in range(20)]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg(tmp_path / "nope.jsonl"), tok, 0)
    assert "nope.jsonl" in one_line(e) and "not found" in str(e.value)


def test_missing_val_file(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(DataError, match=r"data.val_path '.*val.jsonl' not found"):
        build_datasets(data_cfg(p, val_path=str(tmp_path / "val.jsonl")), tok, 0)


def test_unknown_extension(tmp_path, tok):
    p = tmp_path / "d.txt"
    p.write_text("hello")
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg(p), tok, 0)
    assert "unknown extension '.txt'" in one_line(e) and ".jsonl" in str(e.value)


def test_unknown_builtin(tok):
    with pytest.raises(DataError, match="builtin:toy-sql"):
        build_datasets(data_cfg("builtin:nope"), tok, 0)


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD, raw_lines={3: '{"instruction": "x", "output": '})
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg(p), tok, 0)
    msg = one_line(e)
    assert f"{p}:3:" in msg and "malformed JSON" in msg and "data.on_bad_line=skip" in msg


def test_record_missing_fields_is_a_bad_line(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD[:4] + [{"instruction": "no answer here"}] + GOOD[4:])
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg(p), tok, 0)
    msg = one_line(e)
    assert f"{p}:5:" in msg and "'output'" in msg and "data.on_bad_line=skip" in msg


def test_skip_mode_warns_per_line_and_counts(tmp_path, tok, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD + [{"instruction": "no answer"}],
                    raw_lines={2: "not json", 7: "[1, 2]"})
    splits = build_datasets(data_cfg(p, on_bad_line="skip"), tok, 0)
    err = capsys.readouterr().err
    assert f"{p}:2:" in err and f"{p}:7:" in err and f"{p}:21:" in err
    assert splits.stats["bad_lines"] == 3
    assert splits.stats["skipped"] == {"malformed JSON": 1, "not an object": 1, "missing field 'output'": 1}
    assert len(splits.train) == 18 and splits.stats["records_read"] == 20  # the malformed line is not a record


def test_skip_mode_caps_the_warnings(tmp_path, tok, capsys):
    n_bad = MAX_BAD_LINE_WARNINGS + 15
    p = write_jsonl(tmp_path / "d.jsonl", GOOD[:2] + [{"instruction": "x"}] * n_bad)
    splits = build_datasets(data_cfg(p, on_bad_line="skip"), tok, 0)
    err = capsys.readouterr().err
    assert err.count("shardtune: skipping") == MAX_BAD_LINE_WARNINGS
    assert f"skipped {n_bad} bad records" in err
    assert splits.stats["bad_lines"] == n_bad


def test_empty_after_filtering(tmp_path, tok, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}, {"instruction": "y", "output": ""}])
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg(p, on_bad_line="skip"), tok, 0)
    assert "no usable records" in one_line(e) and "2 read" in str(e.value)


def test_empty_file(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        build_datasets(data_cfg(p), tok, 0)


def test_unknown_and_undetectable_format(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg(p), tok, 0)
    msg = one_line(e)
    assert "keys (foo, bar)" in msg and "alpaca" in msg and "sharegpt" in msg and "data.format" in msg
    with pytest.raises(DataError, match="unknown format 'csvish'"):
        build_datasets(data_cfg(p, format="csvish"), tok, 0)


def test_explicit_format_mismatch_names_line(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(DataError, match=rf"{p}:1: .*'prompt'"):
        build_datasets(data_cfg(p, format="prompt_completion"), tok, 0)


def test_json_array_lines_and_syntax_errors(tmp_path, tok):
    recs = GOOD[:3] + [{"instruction": "no output"}]
    p = tmp_path / "d.json"
    text = json.dumps(recs, indent=2)
    p.write_text(text)
    starts = [i for i, t in enumerate(text.splitlines(), 1) if t == "  {"]  # the line each record starts on
    assert len(starts) == 4
    with pytest.raises(DataError, match=rf"{p}:{starts[3]}: record has no 'output'"):
        build_datasets(data_cfg(p), tok, 0)
    p.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON"):
        build_datasets(data_cfg(p, on_bad_line="skip"), tok, 0)


def test_json_file_of_json_lines(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.json", GOOD)
    assert build_datasets(data_cfg(p), tok, 0).stats["records_used"] == 20


def test_csv_and_parquet_quietly_and_without_home_cache(tmp_path, tok, capfd, monkeypatch):
    import pandas as pd

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    df = pd.DataFrame({"prompt": [f"What is two plus {i}? " for i in range(12)],
                       "completion": [f"Four, {i}" for i in range(12)]})
    df.loc[3, "completion"] = None
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    capfd.readouterr()
    for name in ("d.csv", "d.parquet"):
        splits = build_datasets(data_cfg(tmp_path / name, on_bad_line="skip"), tok, 0)
        assert splits.stats["format"] == "prompt_completion" and len(splits.train) == 11
        assert splits.stats["skipped"] == {"missing field 'completion'": 1}
    err = capfd.readouterr().err
    # one warning per bad row naming it, nothing else (no progress bars)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert f"{tmp_path / 'd.csv'}:5:" in err  # header is line 1, rows start at 2
    assert all(ln.startswith("shardtune:") for ln in lines), lines
    assert not any(home.rglob("*")), list(home.rglob("*"))


def test_max_samples_limits_records(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)
    splits = build_datasets(data_cfg(p, max_samples=5), tok, 0)
    assert splits.stats["records_used"] == 5 and len(splits.train) == 5


def test_holdout_is_seeded_and_never_empty(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)

    def val_answers(seed, frac):
        s = build_datasets(data_cfg(p, val_fraction=frac), tok, seed)
        return sorted(target_text(tok, v) for v in s.val), len(s.train)

    a, n_train = val_answers(1, 0.2)
    assert len(a) == 4 and n_train == 16
    assert val_answers(1, 0.2)[0] == a
    assert val_answers(2, 0.2)[0] != a
    assert len(val_answers(0, 0.01)[0]) == 1  # rounds to 0 but at least one record is held out
    assert val_answers(0, 0.0) == ([], 20)
    two = write_jsonl(tmp_path / "two.jsonl", GOOD[:2])
    s = build_datasets(data_cfg(two, val_fraction=0.9), tok, 0)
    assert len(s.train) == 1 and len(s.val) == 1


def test_val_path(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)
    v = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "What is two plus two? ", "completion": "Four."}])
    s = build_datasets(data_cfg(p, val_path=str(v), val_fraction=0.5), tok, 0)
    assert len(s.train) == 20 and len(s.val) == 1
    assert target_text(tok, s.val[0]).startswith("Four.")


def test_truncation_and_records_without_response(tmp_path, tok, capsys):
    long_answer = {"instruction": "Say hello", "output": "Hello Bob! " * 40}
    long_prompt = {"instruction": "What is two plus two? " * 40, "output": "Four."}
    p = write_jsonl(tmp_path / "d.jsonl", [long_answer, long_prompt] + GOOD[:3])
    s = build_datasets(data_cfg(p, max_seq_len=48), tok, 0)
    assert all(len(x["input_ids"]) <= 48 for x in s.train)
    assert s.stats["truncated"] == 2
    assert s.stats["skipped"] == {"no response tokens within max_seq_len": 1}
    assert len(s.train) == 4
    assert "no response tokens within data.max_seq_len=48" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("RANK") not in (None, "0"), reason="warnings print on rank 0 only")
def test_bad_lines_also_counted_in_val_file(tmp_path, tok, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)
    v = write_jsonl(tmp_path / "v.jsonl", GOOD[:3], raw_lines={2: "{oops"})
    s = build_datasets(data_cfg(p, val_path=str(v), on_bad_line="skip"), tok, 0)
    assert s.stats["bad_lines"] == 1 and len(s.val) == 2
    assert f"{v}:2:" in capsys.readouterr().err


def test_nothing_left_after_truncation(tmp_path, tok, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "What is two plus two? " * 30, "output": "Four."}] * 3)
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg(p, max_seq_len=16), tok, 0)
    assert "no training samples left" in one_line(e) and "data.max_seq_len=16" in str(e.value)
