"""What `shardtune evaluate` prints: the summary, and a short table of the worst failures (the results JSON has every
record)."""

from __future__ import annotations

from typing import Sequence

from shardtune.eval.text2sql.score import FAILURE_ORDER

# generic data: a generation that differs from the gold answer
_SEVERITY = {kind: i for i, kind in enumerate(FAILURE_ORDER + ("mismatch",))}


def format_summary(summary: dict) -> str:
    lines = [f"evaluated {summary['n']} records of {summary.get('data')} ({summary['metric']} metric)"]
    if summary["metric"] == "sql":
        lines.append(f"  exact match (normalized SQL): {summary['exact_match']:.3f}")
        ea = summary["execution_accuracy"]
        unscored = summary["execution_unscored"]
        db = ", ".join(f"{k} {v}" for k, v in summary["databases"].items()) or "none"
        lines.append(f"  execution accuracy: {'n/a' if ea is None else f'{ea:.3f}'} over {summary['execution_scored']}"
                     f" records (databases: {db}; unscored: {unscored['no_database']} without a schema, "
                     f"{unscored['gold_failed']} whose gold query fails, {unscored['uninformative']} whose gold "
                     f"result is empty on every synthesized database)")
        kinds = summary.get("prediction_error_kinds", {})
        listed = ", ".join(f"{v} {k}" for k, v in kinds.items() if v) or "none"
        lines.append(f"  prediction errors: {summary.get('prediction_errors', 0)} ({listed})")
        if summary.get("note"):
            lines.append(f"  note: {summary['note']}")
    else:
        em = summary.get("exact_match")
        lines.append(f"  eval loss {summary['eval_loss']:.4f} (perplexity "
                     f"{summary['perplexity'] if summary['perplexity'] is None else round(summary['perplexity'], 3)}) "
                     f"over {summary['loss_tokens']} tokens; exact match {'n/a' if em is None else f'{em:.3f}'}")
    if summary.get("out"):
        lines.append(f"  per-record results: {summary['out']}")
    return "\n".join(lines)


def worst_failures(rows: Sequence[dict], n: int = 5) -> list[dict]:
    """Up to `n` failed records, worst kind first (empty, unparsable, refused, timeout, too large, error, wrong
    result; for generic data, mismatches), in file order within a kind."""
    failed = [r for r in rows if r.get("status") in _SEVERITY]
    return sorted(failed, key=lambda r: (_SEVERITY[r["status"]], r["index"]))[:n]


def _cell(text: str, width: int, last_line: bool = False) -> str:
    """One line of at most `width` characters: the text with its whitespace collapsed, or only its last line (a
    prompt's question comes last)."""
    lines = [s for s in str(text).splitlines() if s.strip()]
    if last_line:
        lines = lines[-1:]
    s = " ".join(" ".join(lines).split())
    return (s if len(s) <= width else s[:width - 3] + "...").ljust(width)


def format_worst(rows: Sequence[dict], out: str | None = None, n: int = 5) -> str:
    """The table printed after the summary: where, status, question, gold and predicted answer of the worst
    failures; empty when nothing failed."""
    worst = worst_failures(rows, n)
    if not worst:
        return ""
    total = sum(1 for r in rows if r.get("status") in _SEVERITY)
    widths = (16, 12, 30, 34, 34)
    head = ("where", "status", "question", "gold", "predicted")
    title = f"worst {len(worst)} of {total} failures" + (f" (every record: {out})" if out else "")
    lines = [title, "  " + " ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for r in worst:
        question = _cell(r.get("question", r.get("prompt", "")), widths[2], last_line=True)
        pred = r["pred"] if str(r["pred"]).strip() else "(empty)"
        where = str(r.get("where", "")).replace("\\", "/").rsplit("/", 1)[-1]  # file name:line, not the path
        cells = (_cell(where, widths[0]), _cell(r["status"], widths[1]), question,
                 _cell(r["gold"], widths[3]), _cell(pred, widths[4]))
        lines.append("  " + " ".join(cells).rstrip())
    return "\n".join(lines)
