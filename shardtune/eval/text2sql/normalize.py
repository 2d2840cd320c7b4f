"""SQL text: tokens, the canonical form exact match compares, the statement inside a model's answer, and the literals
a query compares columns against (which synth.py plants into synthesized tables)."""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""'(?:[^']|'')*'            # single-quoted literal ('' escapes a quote)
      | "(?:[^"]|"")*"            # double-quoted: SQLite reads it as a literal when no column has that name
      | `[^`]*` | \[[^\]]*\]       # quoted identifiers
      | \d+\.\d*|\.\d+|\d+        # numbers
      | [A-Za-z_][A-Za-z_0-9$]*   # words
      | <=|>=|<>|!=|==|\|\|       # two-character operators
      | \S                        # anything else, one character
    """, re.VERBOSE)


def sql_tokens(sql: str) -> list[str]:
    return _TOKEN.findall(sql)


def normalize_sql(sql: str) -> str:
    """Canonical text for exact match: case-folded, one space between tokens, literals in single quotes, quoted
    identifiers unquoted, `<>`/`==` spelled `!=`/`=`, no trailing semicolon."""
    out = []
    for tok in sql_tokens(sql.strip().rstrip(";").strip()):
        if tok[0] in "'\"":
            body = tok[1:-1].replace(tok[0] * 2, tok[0])
            tok = "'" + body.replace("'", "''") + "'"
        elif tok[0] in "`[":
            tok = tok[1:-1]
        elif tok == "<>":
            tok = "!="
        elif tok == "==":
            tok = "="
        out.append(tok.lower())
    text = " ".join(out)
    return text.rstrip(" ;")


def exact_match(gold: str, pred: str) -> bool:
    return normalize_sql(gold) == normalize_sql(pred)


def extract_sql(text: str) -> str:
    """The first SQL statement in a model's answer: inside a ``` fence if there is one, up to the first `;`
    outside quotes."""
    fence = re.search(r"```(?:sql|sqlite)?\s*\n?(.*?)(?:```|$)", text, flags=re.S | re.I)
    if fence:
        text = fence.group(1)
    text = text.strip()
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            return text[:i].strip()
    return text


def has_top_level_order_by(sql: str) -> bool:
    """ORDER BY outside any parenthesis: then the order of the result rows is part of the answer."""
    depth = 0
    toks = [t.lower() for t in sql_tokens(sql)]
    for i, t in enumerate(toks):
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
        elif t == "order" and depth == 0 and i + 1 < len(toks) and toks[i + 1] == "by":
            return True
    return False


def sql_literals(sql: str) -> tuple[list[str], list[float]]:
    """String and number literals of a query (numbers not part of identifiers), to plant into synthesized tables."""
    strings, numbers = [], []
    toks = sql_tokens(sql)
    for i, tok in enumerate(toks):
        if tok[0] in "'\"":
            s = tok[1:-1].replace(tok[0] * 2, tok[0])
            strings.append(s.strip("%"))
        elif re.fullmatch(r"\d+\.?\d*|\.\d+", tok):
            prev = toks[i - 1].lower() if i else ""
            if prev in ("limit", "offset"):
                continue
            numbers.append(float(tok))
    return [s for s in strings if s], numbers


_COMPARE = {"=", "!=", "<>", "==", ">", "<", ">=", "<=", "like"}


def _literal_value(tok: str):
    if tok[0] in "'\"":
        return tok[1:-1].replace(tok[0] * 2, tok[0])
    if re.fullmatch(r"\d+\.?\d*|\.\d+", tok):
        v = float(tok)
        return int(v) if v.is_integer() else v
    return None


def column_literals(sql: str) -> dict[str, list]:
    """Values a query compares columns against, by lower-cased column name: `T1.age > 30`, `name LIKE '%x%'`,
    `year BETWEEN 1990 AND 2000`, `city IN ('a', 'b')`. Planting them in those columns makes WHERE clauses select
    rows."""
    toks = sql_tokens(sql)
    low = [t.lower() for t in toks]
    out: dict[str, list] = {}

    def add(col: str, v):
        if v is not None and v != "":
            out.setdefault(col.lower(), []).append(v)

    for i, t in enumerate(low):
        if not re.match(r"[a-z_]", t) or t in _COMPARE:
            continue
        nxt = low[i + 1] if i + 1 < len(low) else ""
        if nxt == "not" and i + 2 < len(low):
            i, nxt = i + 1, low[i + 2]
        if nxt in _COMPARE and i + 2 < len(toks):
            v = _literal_value(toks[i + 2])
            if isinstance(v, str) and nxt == "like":
                v = ("like", v)
            add(t, v)
        elif nxt == "between" and i + 4 < len(toks) and low[i + 3] == "and":
            a, b = _literal_value(toks[i + 2]), _literal_value(toks[i + 4])
            add(t, a)
            add(t, b)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                add(t, (a + b) // 2 if isinstance(a, int) and isinstance(b, int) else (a + b) / 2)
        elif nxt == "in" and i + 2 < len(low) and low[i + 2] == "(":
            j = i + 3
            while j < len(toks) and low[j] != ")":
                add(t, _literal_value(toks[j]) if low[j] != "," else None)
                j += 1
    return out
