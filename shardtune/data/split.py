"""Split text-to-SQL records by database: whole databases go to train or held out, so held-out accuracy measures
questions on schemas the model never saw (Spider's own protocol), never a paraphrase of a training question.
`shardtune split` writes train.json, heldout.json and split.json (which databases, seed, counts) to a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from shardtune.errors import ConfigError, DataError

# DB-GPT-Hub's Spider instructions begin "<db_id> contains tables such as ..." and carry no db_id key.
_DB_ID_IN_TEXT = re.compile(r"^\s*(\w+) contains tables such as", re.I)
SPLIT_FILE = "split.json"


def record_db_id(rec: dict) -> Optional[str]:
    if isinstance(rec, dict) and rec.get("db_id") is not None:
        return str(rec["db_id"])
    m = _DB_ID_IN_TEXT.match(rec.get("instruction") or "") if isinstance(rec, dict) else None
    return m.group(1) if m else None


def split_by_database(data_path: str | Path, out_dir: str | Path, heldout_fraction: float = 0.2,
                      seed: int = 0) -> dict:
    """Write out_dir/{train,heldout}.json (records unchanged, in file order) and split.json; return split.json's dict.
    round(n_databases * heldout_fraction) databases (at least 1, at most n-1) are held out, chosen by `seed`."""
    from shardtune.data.pipeline import BadLines, iter_records

    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"--heldout {heldout_fraction}: must be between 0 and 1 (e.g. 0.2)")
    records = [rec for _, rec in iter_records(str(data_path), "--data", BadLines("error", "--data"))]
    ids = [record_db_id(r) for r in records]
    missing = sum(i is None for i in ids)
    if missing:
        first = ids.index(None)
        raise DataError(f"--data '{data_path}': record {first} has no db_id (and no '<db_id> contains tables such "
                        f"as' instruction); {missing} records cannot be split by database; add a db_id field")
    counts = Counter(ids)
    dbs = sorted(counts)
    if len(dbs) < 2:
        raise DataError(f"--data '{data_path}' has {len(dbs)} database(s); a split by database needs at least 2")
    n_held = min(len(dbs) - 1, max(1, round(len(dbs) * heldout_fraction)))
    order = dbs[:]
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    train = [r for r, d in zip(records, ids) if d not in held]
    heldout = [r for r, d in zip(records, ids) if d in held]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "train.json", train)
    _write_json(out / "heldout.json", heldout)
    info = {"source": str(data_path), "seed": seed, "heldout_fraction": heldout_fraction,
            "train_databases": sorted(set(dbs) - held), "heldout_databases": sorted(held),
            "train_records": len(train), "heldout_records": len(heldout),
            "records_per_database": dict(sorted(counts.items()))}
    _write_json(out / SPLIT_FILE, info)
    return info


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Split text-to-SQL records by database (whole databases train or held out) into "
                          "OUT/train.json, OUT/heldout.json and OUT/split.json.")
    parser.add_argument("--data", required=True, metavar="FILE", help="records with db_id (or DB-GPT-Hub instructions)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the two files and split.json go")
    parser.add_argument("--heldout", type=float, default=0.2, metavar="FRACTION",
                        help="fraction of the databases held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="which databases are held out (default 0)")


def run(args: argparse.Namespace) -> int:
    info = split_by_database(args.data, args.out, args.heldout, args.seed)
    n_dbs = len(info["train_databases"])
    print(f"train: {info['train_records']} records on {n_dbs} databases -> {args.out}/train.json")
    print(f"held out: {info['heldout_records']} records on {', '.join(info['heldout_databases'])} -> "
          f"{args.out}/heldout.json")
    return 0
