"""The bundled toy text-to-SQL set (`data.path: builtin:toy-sql`) and the corpus the built-in tokenizer is trained on.

The records are generated, not shipped: question templates over three made-up tables, filled with a fixed set of
values in a fixed order, so every install produces the same 1,184 training and 146 held-out records. They use
DB-GPT-Hub's text2sql record shape (db_id, instruction = schema + task, input = question, output = SQL, history) so
the quickstart exercises the same format as real text-to-SQL data. Vocabulary and length are kept small on purpose:
the quickstart's 1M-parameter Llama learns the task in 300 CPU steps.
"""

from __future__ import annotations

import random

BUILTIN_DATA = "builtin:toy-sql"
DB_ID = "concert_singer"

TABLES = {
    "singer": ("singer_id", "name", "country", "age"),
    "stadium": ("stadium_id", "name", "city", "capacity"),
    "concert": ("concert_id", "name", "stadium_id", "year"),
}
SCHEMA = "\n".join(f"CREATE TABLE {t} ({', '.join(cols)})" for t, cols in TABLES.items())
TASK = "-- Answer with one SQLite query."
INSTRUCTION = f"{SCHEMA}\n{TASK}"

# Many values per slot on purpose: with few, a tiny model memorises (question, value) pairs; with many it has to
# learn to copy the value from the question, which is what lets it answer held-out pairs.
COUNTRIES = ["France", "Germany", "Spain", "Italy", "Japan", "Brazil", "Canada", "Egypt", "Chile", "Norway",
             "India", "Kenya", "Peru", "Mexico", "Sweden", "Poland", "Greece", "Turkey", "Ghana", "Nepal", "Cuba",
             "Iran", "Chad", "Fiji"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Lima", "Oslo", "Cairo", "Lyon", "Porto", "Milan", "Delhi",
          "Quito", "Dakar", "Seoul", "Kyiv", "Sofia", "Riga"]
STADIUMS = ["Star Arena", "Blue Dome", "Lake Park", "Red Field", "Sun Hall", "West Bowl", "Oak Court", "Pine Ring",
            "Gold Dome", "Iron Park", "Rose Hall", "Moon Bowl"]
YEARS = list(range(2008, 2024))
AGES = [20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70]
CAPACITIES = [5000, 8000, 10000, 15000, 20000, 30000, 40000, 60000, 80000]
SINGERS = ["Anna Berg", "Tom Lee", "Mia Rossi", "Ken Sato", "Lea Roy", "Omar Ali", "Ivy Chen", "Max Vogel",
           "Eva Lund", "Raj Patel", "Noa Levi", "Luis Mora"]

# (question variants, SQL, slot -> values). Each variant is a paraphrase with the same SQL, so the model must map
# wording to structure and copy the value, which is learnable and measurable with few steps.
_TEMPLATES: list[tuple[tuple[str, ...], str, dict[str, list]]] = [
    (("How many singers are from {country}?", "Count the singers from {country}.",
      "What is the number of singers whose country is {country}?"),
     "SELECT count(*) FROM singer WHERE country = '{country}'", {"country": COUNTRIES}),
    (("What are the names of singers from {country}?", "List the names of singers from {country}."),
     "SELECT name FROM singer WHERE country = '{country}'", {"country": COUNTRIES}),
    (("What is the average age of singers from {country}?", "Give the average age of singers from {country}."),
     "SELECT avg(age) FROM singer WHERE country = '{country}'", {"country": COUNTRIES}),
    (("What are the names of singers older than {age}?", "List the names of singers whose age is above {age}."),
     "SELECT name FROM singer WHERE age > {age}", {"age": AGES}),
    (("How many singers are younger than {age}?", "Count the singers younger than {age}."),
     "SELECT count(*) FROM singer WHERE age < {age}", {"age": AGES}),
    (("What are the names of stadiums in {city}?", "List the names of stadiums in {city}."),
     "SELECT name FROM stadium WHERE city = '{city}'", {"city": CITIES}),
    (("How many stadiums are in {city}?", "Count the stadiums in {city}."),
     "SELECT count(*) FROM stadium WHERE city = '{city}'", {"city": CITIES}),
    (("What is the largest capacity of stadiums in {city}?", "Give the maximum capacity of stadiums in {city}."),
     "SELECT max(capacity) FROM stadium WHERE city = '{city}'", {"city": CITIES}),
    (("What is the capacity of {stadium}?", "Show the capacity of the stadium named {stadium}."),
     "SELECT capacity FROM stadium WHERE name = '{stadium}'", {"stadium": STADIUMS}),
    (("Which stadiums have a capacity above {cap}?", "List the names of stadiums with capacity above {cap}."),
     "SELECT name FROM stadium WHERE capacity > {cap}", {"cap": CAPACITIES}),
    (("How many concerts were held in {year}?", "Count the concerts in {year}."),
     "SELECT count(*) FROM concert WHERE year = {year}", {"year": YEARS}),
    (("What are the names of concerts held in {year}?", "List the names of concerts in {year}."),
     "SELECT name FROM concert WHERE year = {year}", {"year": YEARS}),
    (("What are the names of concerts held at {stadium}?", "List the concerts at {stadium}."),
     "SELECT T1.name FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id "
     "WHERE T2.name = '{stadium}'", {"stadium": STADIUMS}),
    (("How many concerts were held in {city}?", "Count the concerts held in {city}."),
     "SELECT count(*) FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id "
     "WHERE T2.city = '{city}'", {"city": CITIES}),
    (("How many singers from {country} are older than {age}?",
      "Count the singers from {country} whose age is above {age}."),
     "SELECT count(*) FROM singer WHERE country = '{country}' AND age > {age}",
     {"country": COUNTRIES, "age": [25, 35, 45, 55]}),
    (("How many concerts were held at {stadium} in {year}?",),
     "SELECT count(*) FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id "
     "WHERE T2.name = '{stadium}' AND T1.year = {year}", {"stadium": STADIUMS, "year": [2014, 2016, 2018, 2020]}),
    (("What is the youngest age of singers from {country}?", "Give the minimum age of singers from {country}."),
     "SELECT min(age) FROM singer WHERE country = '{country}'", {"country": COUNTRIES}),
    (("What is the average capacity of stadiums in {city}?", "Give the mean capacity of stadiums in {city}."),
     "SELECT avg(capacity) FROM stadium WHERE city = '{city}'", {"city": CITIES}),
    (("In which city is {stadium}?", "What city is the stadium {stadium} in?"),
     "SELECT city FROM stadium WHERE name = '{stadium}'", {"stadium": STADIUMS}),
    (("How many concerts were held after {year}?", "Count the concerts after {year}."),
     "SELECT count(*) FROM concert WHERE year > {year}", {"year": YEARS}),
    (("How old is {singer}?", "What is the age of {singer}?"),
     "SELECT age FROM singer WHERE name = '{singer}'", {"singer": SINGERS}),
    (("Which country is {singer} from?", "What is the country of {singer}?"),
     "SELECT country FROM singer WHERE name = '{singer}'", {"singer": SINGERS}),
    (("How many singers are there?", "Count all singers.", "What is the total number of singers?"),
     "SELECT count(*) FROM singer", {}),
    (("How many stadiums are there?", "Count all stadiums."), "SELECT count(*) FROM stadium", {}),
    (("List the names of singers ordered by age.", "Show singer names sorted by age."),
     "SELECT name FROM singer ORDER BY age", {}),
    (("Which country has the most singers?", "What country do most singers come from?"),
     "SELECT country FROM singer GROUP BY country ORDER BY count(*) DESC LIMIT 1", {}),
    (("What is the name of the oldest singer?", "Who is the oldest singer?"),
     "SELECT name FROM singer ORDER BY age DESC LIMIT 1", {}),
    (("How many singers are from each country?", "Count the singers per country."),
     "SELECT country, count(*) FROM singer GROUP BY country", {}),
    (("Which stadium has the largest capacity?", "What is the name of the biggest stadium?"),
     "SELECT name FROM stadium ORDER BY capacity DESC LIMIT 1", {}),
]


def _fills(slots: dict[str, list]) -> list[dict]:
    """All slot assignments of a template (the product over its slots, in a fixed order)."""
    fills = [{}]
    for name, values in slots.items():
        fills = [{**f, name: v} for f in fills for v in values]
    return fills


BUILTIN_HELDOUT = "builtin:toy-sql-heldout"
HELDOUT_EVERY = 6  # one value in 6 of each template with several values is held out, with all its paraphrases


def _held_out_fills() -> set[tuple[int, int]]:
    """(template index, fill index) pairs held out. The held-out position is shifted by the template's index, so each
    template holds out different values; a pair is held out only if each of its values is trained on in another
    template (a value no training record contains could not be produced, only guessed). Nothing else is used."""
    candidates = {(t, k) for t, (_, _, slots) in enumerate(_TEMPLATES) for k, _ in enumerate(_fills(slots))
                  if len(_fills(slots)) >= 3 and (k + t) % HELDOUT_EVERY == HELDOUT_EVERY // 2}
    trained_in: dict[str, set[int]] = {}
    for t, (_, _, slots) in enumerate(_TEMPLATES):
        for k, fill in enumerate(_fills(slots)):
            if (t, k) not in candidates:
                for v in fill.values():
                    trained_in.setdefault(str(v), set()).add(t)
    return {(t, k) for t, k in candidates
            if all(trained_in.get(str(v), set()) - {t} for v in _fills(_TEMPLATES[t][2])[k].values())}


def _all_records() -> list[tuple[bool, dict]]:
    """(held out?, record) for every (template, value, paraphrase). A held-out (template, value) pair is held out with
    all its paraphrases, so its SQL never appears in training: the model must put a value it saw elsewhere into a
    structure it learned from other values. Templates with fewer than three values stay whole in training."""
    held_out = _held_out_fills()
    out = []
    for t, (variants, sql, slots) in enumerate(_TEMPLATES):
        for k, fill in enumerate(_fills(slots)):
            held = (t, k) in held_out
            for question in variants:
                out.append((held, {"db_id": DB_ID, "instruction": INSTRUCTION, "input": question.format(**fill),
                                   "output": sql.format(**fill), "history": []}))
            if not held:
                # the same question once without the schema, so `shardtune generate "<question>"` works as typed
                out.append((False, {"db_id": DB_ID, "instruction": variants[0].format(**fill), "input": "",
                                    "output": sql.format(**fill), "history": []}))
    return out


def toy_sql_records(seed: int = 0, heldout: bool = False) -> list[dict]:
    """The training records (heldout=False: builtin:toy-sql) or the held-out ones (builtin:toy-sql-heldout), in a
    seeded but fixed order (no dependence on hash randomisation or the caller's RNG state)."""
    records = [r for held, r in _all_records() if held == heldout]
    random.Random(seed).shuffle(records)
    return records


def scored_split(name: str) -> str:
    """What `shardtune evaluate --data NAME` scores: for the built-in toy set, its held-out split (scoring the records
    the quickstart trained on would measure memory, not the model); any other name unchanged."""
    return BUILTIN_HELDOUT if name == BUILTIN_DATA else name


def builtin_records(name: str, what: str = "data.path") -> list[dict]:
    """Records of a built-in data set by name; an unknown name is a one-line error listing the known ones."""
    if name == BUILTIN_DATA:
        return toy_sql_records()
    if name == BUILTIN_HELDOUT:
        return toy_sql_records(heldout=True)
    from shardtune.errors import DataError
    raise DataError(f"{what} '{name}' is not a built-in data set; the built-in ones are {BUILTIN_DATA} (training) "
                    f"and {BUILTIN_HELDOUT} (held out from it, for evaluate)")


def _chatml(records: list[dict]) -> list[str]:
    # Same layout as shardtune.builtin.templates.CHATML_TEMPLATE renders (checked by a test), so the tokenizer learns
    # merges for the exact strings it will see, markers included.
    out = []
    for r in records:
        user = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
        out.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{r['output']}<|im_end|>\n</s>")
    return out


def builtin_corpus() -> list[str]:
    """Texts the built-in tiny tokenizer is trained on: the training records (never the held-out ones) rendered
    through ChatML, plus the plain prompt/response pieces and a few generic lines so other layouts (alpaca, plain)
    do not fall back to bytes."""
    records = toy_sql_records()
    texts = _chatml(records)
    texts += [f"{r['input']}\n{r['output']}" for r in records]
    texts += [
        "### Instruction:\n", "### Input:\n", "### Response:\n",
        "SELECT name, count(*) FROM singer WHERE age >= 30 AND country != 'France' GROUP BY country",
        "The quick brown fox jumps over the lazy dog. 0123456789",
    ]
    return texts
