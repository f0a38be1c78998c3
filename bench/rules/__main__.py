"""bench/rules: criteria evaluation, ours vs hand-written Python vs rule-engine, in one run.

The same criteria (the shipped example's "deal needs approval" test) are evaluated over the
same records by:

* ours          - the mapping-file criteria compiled by connector.rules (what the server runs);
* hand-exact    - hand-written Python with the SAME semantics as ours: money compared as
                  Decimal (floats via repr), blanks handled. The fair ceiling;
* hand-naive    - the fastest plain Python: compares floats directly. Faster, but 0.1-style
                  float artefacts can change answers, so it is a speed reference only;
* rule-engine   - the `rule-engine` PyPI library, a peer that also compiles text rules.

All engines must agree on every record before anything is timed. Not a test. Usage:

    .venv/bin/python -m bench.rules --records 2000 --rounds 7
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from importlib.metadata import version
from typing import Any

import rule_engine

from connector.approvals.spec import EvalContext, FieldSpec
from connector.rules.criteria import compile_when
from connector.rules.loader import read_yaml

CRITERIA_YAML = """
all:
  - not: {stage: {in: [Closed Won, Closed Lost]}}
  - any:
      - amount: {gt: 100000}
      - credit_score: {lt: 70}
      - term_months: {gt: 12}
"""
RULE_ENGINE_TEXT = (
    'not stage in ["Closed Won", "Closed Lost"] and ('
    "(amount != null and amount > 100000) or "
    "(credit_score != null and credit_score < 70) or "
    "(term_months != null and term_months > 12))"
)
FIELDS = {
    f.name: f
    for f in (
        FieldSpec("amount", "Amount", "money"),
        FieldSpec("credit_score", "Account.Credit_Score__c", "number"),
        FieldSpec("term_months", "Term_Months__c", "number"),
        FieldSpec("stage", "StageName", "string"),
    )
}
STAGES = ["Prospecting", "Qualification", "Negotiation", "Closed Won", "Closed Lost"]
TODAY = date(2024, 6, 15)
NOW = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)

Engine = Callable[[EvalContext], bool]


# --- the hand-written functions ---------------------------------------------------------------

_LIMIT = Decimal(100000)
_CLOSED = frozenset({"Closed Won", "Closed Lost"})


def _exact(value: Any) -> Decimal | int | None:
    # What a careful engineer writes for exact money: ints as they are, floats via repr.
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def hand_exact(ctx: EvalContext) -> bool:
    values = ctx.values
    if values.get("stage") in _CLOSED:
        return False
    amount = _exact(values.get("amount"))
    if amount is not None and amount > _LIMIT:
        return True
    score = _exact(values.get("credit_score"))
    if score is not None and score < 70:
        return True
    term = _exact(values.get("term_months"))
    return term is not None and term > 12


def hand_naive(ctx: EvalContext) -> bool:
    values = ctx.values
    if values.get("stage") in _CLOSED:
        return False
    amount = values.get("amount")
    score = values.get("credit_score")
    term = values.get("term_months")
    return (
        (amount is not None and amount > 100000)
        or (score is not None and score < 70)
        or (term is not None and term > 12)
    )


# --- records and engines ----------------------------------------------------------------------


def make_records(count: int, seed: int) -> list[EvalContext]:
    """Values as a CRM's JSON decodes them: floats and ints, some blanks."""
    rng = random.Random(seed)

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.1 else value

    records = []
    for _ in range(count):
        amount = rng.choice([round(rng.uniform(1000, 250000), 2), rng.randrange(1000, 250000)])
        values = {
            "stage": maybe(rng.choice(STAGES)),
            "amount": maybe(amount),
            "credit_score": maybe(rng.randrange(30, 100)),
            "term_months": maybe(rng.choice([6, 12, 18, 24, 36])),
        }
        records.append(EvalContext(values, None, frozenset(), TODAY, NOW))
    return records


def build_engines() -> dict[str, Engine]:
    criteria_data, _ = read_yaml(CRITERIA_YAML, "<bench>")
    ours = compile_when(criteria_data, FIELDS, source="<bench>")
    rule = rule_engine.Rule(RULE_ENGINE_TEXT, context=rule_engine.Context(default_value=None))

    def peer(ctx: EvalContext) -> bool:
        return bool(rule.matches(ctx.values))

    return {"hand-exact": hand_exact, "hand-naive": hand_naive, "ours": ours, "rule-engine": peer}


def check_agreement(engines: dict[str, Engine], records: list[EvalContext]) -> int:
    """Every engine must give the same answer on every record; returns how many match."""
    for ctx in records:
        answers = {name: engine(ctx) for name, engine in engines.items()}
        if len(set(answers.values())) != 1:
            raise SystemExit(f"engines disagree on {dict(ctx.values)}: {answers}")
    return sum(hand_exact(ctx) for ctx in records)


def time_engine(engine: Engine, records: list[EvalContext], rounds: int, min_evals: int) -> list[float]:
    """ns per evaluation for each round (each round loops the records enough times)."""
    loops = max(1, min_evals // len(records))
    results = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(loops):
            for ctx in records:
                engine(ctx)
        results.append((time.perf_counter_ns() - start) / (loops * len(records)))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rules", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-evals", type=int, default=200_000, help="evaluations per round (fast engines)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    records = make_records(args.records, args.seed)
    engines = build_engines()
    matching = check_agreement(engines, records)
    print(f"bench/rules: {len(records)} records ({matching} need approval), {args.rounds} rounds")
    print(f"Python {platform.python_version()} on {platform.machine()}, rule-engine {version('rule-engine')}")
    print("all engines agree on every record\n")

    best: dict[str, float] = {}
    print(f"{'engine':<14}{'best ns/eval':>14}{'median':>10}")
    for name, engine in engines.items():
        # rule-engine is ~100x slower: fewer evaluations keep the run short.
        evals = args.min_evals if name != "rule-engine" else max(len(records), args.min_evals // 50)
        results = time_engine(engine, records, args.rounds, evals)
        best[name] = min(results)
        print(f"{name:<14}{best[name]:>14.0f}{statistics.median(results):>10.0f}")

    exact, naive = best["ours"] / best["hand-exact"], best["ours"] / best["hand-naive"]
    print(f"\nours / hand-exact  = {exact:.2f}x   (same semantics; target <= 2x)")
    print(f"ours / hand-naive  = {naive:.2f}x   (float comparisons, no Decimal)")
    print(f"rule-engine / ours = {best['rule-engine'] / best['ours']:.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
