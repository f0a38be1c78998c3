"""Bounded templates: validate refuses what goes over a limit (naming file:line), rendering
stops at the limits and at its time budget, and nothing of a template runs at compile time.

Every check that could hang if a limit broke runs in a subprocess with a time-out: an int
power or a string repetition in C holds the GIL, so a thread guard could not stop it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUARD_SECONDS = 120  # for everything a subprocess runs; each case takes milliseconds to ~1 s

# source -> what validate (check_template) must say; None = nothing
VALIDATE_CASES: dict[str, str | None] = {
    "{{ 10**(10**10) }}": "is above 2**4096",  # constant folding used to hang here
    "x{{ 10**(10**10) }}y": "is above 2**4096",
    "{{ -(10**(10**10)) }}": "is above 2**4096",
    "{{ 2**64 }}": None,
    "{{ 'a'*10**8 }}": "repeating would build more than 131072",
    "{{ [1]*10**8 }}": "repeating would build more than 131072",
    "{{ 'a'*100 }}": None,
    "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}": "range() of more",
    "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}": (
        "loops ran more than 10000"
    ),
    "{% for c in 'a'*100000 %}{% endfor %}": "loops ran more than 10000",
    "{% for i in range(10) %}{% for j in range(10) %}x{% endfor %}{% endfor %}": None,
    "{{ 'a'|center(999999999) }}": "center() width",
    "{{ 'a'.center(999999999) }}": "center() width",
    "{{ 'a'.ljust(10**9) }}": "ljust() width",
    "{{ '%0999999999d' % 1 }}": "a % format width",
    "{{ '%*d'|format(999999999, 1) }}": "`*` widths",
    "{{ '%.2f'|format(2.5) }}": None,
    "{{ range(1000)|join('x'*100000) }}": "join() would build",
    "{{ range(1000)|map('string')|join('x'*1000) }}": "join() would build",
    "{{ 'aaaa'.replace('a', 'b'*100000) }}": "replace() would build",
    "{{ 'aaaa'|replace('a', 'b'*100000) }}": "replace() would build",
    "{{ [[1]*1000]*100|sum(start=[]) }}": "sum() adds numbers",
    "{{ 'x'|indent(999999999) }}": "indent() would add",
    "{{ [1, 2]|batch(999999999, 0)|list }}": "batch() size",
    # doubling in a loop, through a namespace
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "`~` would build",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}": "longer than 131072",
    "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}"
    "{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ ns.s }}": "longer than 131072",
    "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}"
    "{% set ns.s = [ns.s] %}{% endfor %}": "nested more than 32",
    "{% set x %}{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}": "wrote more than",
    "{{ 'x' * 131072 }}{{ 'y' }}": "result is longer than 131072",
    "{{ '{:>999999999}'.format(1) }}": "may not call `format`",
    "{{ lipsum(10**6) }}": "unknown template variable `lipsum`",
}
RENDER_CASES: dict[str, tuple[dict[str, Any], str | None]] = {
    # value-dependent: only the real values go over the limit
    "{{ record.status * record.items }}": ({"status": "ab", "items": 10**8}, "repeating would build"),
    "{{ record.status|center(record.items) }}": ({"status": "ab", "items": 10**9}, "center() width"),
    "{{ record.items ** record.items }}": ({"status": "", "items": 10**6}, "above 2**4096"),
    "{% for i in range(record.items) %}{% endfor %}": ({"status": "", "items": 10**6}, "range() of more"),
    "{{ record.status }}": ({"status": "x" * 200_000, "items": 1}, "longer than 131072"),
    "{{ record.status * record.items }}!": ({"status": "ab", "items": 3}, None),
    # within every size limit, yet slow: the time budget stops it
    "{% for i in range(100) %}{% for j in range(99) %}"
    "{% set y = ('x' * 30000)|replace('x', 'yy')|sort|length %}{% endfor %}{% endfor %}": (
        {"status": "", "items": 1},
        "longer than its 1.0 s budget",
    ),
}

SCRIPT = """
import json, sys, time
from connector.rules.templating import TemplateRenderError, TemplateValue, check_template
cases = json.load(sys.stdin)
out = {"validate": {}, "render": {}}
for source in cases["validate"]:
    started = time.monotonic()
    problems = check_template(source, record_fields=("status", "items"))
    out["validate"][source] = {"problems": [m for m, _ in problems], "seconds": time.monotonic() - started}
for source, values in cases["render"].items():
    started = time.monotonic()
    try:
        TemplateValue(source, "f.yaml:7: rules[0].on.approve.set.status")({"record": values})
        message = None
    except TemplateRenderError as exc:
        message = str(exc)
    out["render"][source] = {"error": message, "seconds": time.monotonic() - started}
print(json.dumps(out))
"""


def run_guarded(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=GUARD_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {args} did not finish within {GUARD_SECONDS} s")


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    cases = {"validate": list(VALIDATE_CASES), "render": {k: v[0] for k, v in RENDER_CASES.items()}}
    done = run_guarded(["-c", SCRIPT], json.dumps(cases))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("source", list(VALIDATE_CASES))
def test_validate_refuses_templates_over_a_limit(results: dict[str, Any], source: str) -> None:
    found = results["validate"][source]
    expected = VALIDATE_CASES[source]
    if expected is None:
        assert found["problems"] == []
    else:
        assert len(found["problems"]) == 1 and expected in found["problems"][0], found
    assert found["seconds"] < 30


@pytest.mark.parametrize("source", list(RENDER_CASES))
def test_rendering_stops_at_the_limits(results: dict[str, Any], source: str) -> None:
    found = results["render"][source]
    expected = RENDER_CASES[source][1]
    if expected is None:
        assert found["error"] is None
        return
    assert found["error"] is not None and expected in found["error"], found
    assert "over a template limit" in found["error"]
    assert "f.yaml:7: rules[0].on.approve.set.status" in found["error"]


def test_validate_names_the_file_and_line_and_does_not_hang(tmp_path: Path) -> None:
    mapping = tmp_path / "deals.yaml"
    mapping.write_text(
        textwrap.dedent(
            """\
            connection: sandbox
            object: deal
            fields:
              amount: {api: amount, type: money}
              status: approval_status
            rules:
              - name: big
                when: {amount: {gt: 100}}
                steps:
                  - name: manager
                    mode: one
                    approvers: [{user: u-1}]
                on:
                  approve:
                    set:
                      status: "{{ 10**(10**10) }}"
                  reject: {set: {status: "{% for i in range(99999) %}{% endfor %}"}}
            """
        )
    )
    done = run_guarded(
        ["-m", "connector", "--env-file", str(tmp_path / "none.env"), "validate", str(tmp_path)]
    )
    assert done.returncode == 1, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert f"{mapping}:16" in output and "is above 2**4096" in output
    assert f"{mapping}:17" in output and "range() of more than 1000 items" in output


def test_the_loader_compiles_hostile_templates_without_running_them() -> None:
    """Compiling alone (no render): Jinja's constant folding must not evaluate anything big."""
    code = (
        "from connector.rules.templating import TemplateValue\n"
        "for source in ['{{ 10**(10**10) }}', \"{{ 'a'|center(10**9) }}\", \"{{ 'a'*10**9 }}\", "
        "\"{{ ('a'*10**5)|wordwrap(1) }}\", \"{{ '%0999999999d'|format(1) }}\"]:\n"
        "    TemplateValue(source)\n"
        "print('compiled')\n"
    )
    done = run_guarded(["-c", code])
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr
