"""Errors reported while loading mapping files.

Every problem found in a mapping file becomes one :class:`MappingError` that names the
file, the line, the key path and what was expected, so a CRM admin can fix it without
reading Python. Loading collects as many errors as it can before giving up, because
fixing one typo per run is miserable.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from connector.errors import FatalError

# A path into the YAML document: mapping keys (str) and sequence indexes (int).
KeyPath = tuple[str | int, ...]

_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class MappingError:
    """One problem in one mapping file."""

    file: str
    line: int  # 1-based; 0 when the file could not be read at all
    key: str  # dotted key path such as "rules[0].when.all[1].amount.gt"; "" for the whole file
    message: str
    hint: str | None = None
    column: int | None = None  # 1-based; only known for YAML syntax errors

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.column is not None:
            where += f":{self.column}"
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return f"{text}; hint: {self.hint}" if self.hint else text


class MappingLoadError(FatalError):
    """Raised by :func:`connector.rules.load_mapping_file`; carries every error found."""

    code = "mapping_error"

    def __init__(self, errors: Iterable[MappingError]) -> None:
        self.errors: list[MappingError] = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors) or "invalid mapping")


def format_path(path: KeyPath) -> str:
    """("rules", 0, "when", "all", 1) -> "rules[0].when.all[1]"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(part):
            out += f".{part}" if out else part
        else:
            # Value-map keys such as "Field Services" are not identifiers.
            out += f"[{part!r}]"
    return out


def did_you_mean(word: object, candidates: Iterable[str]) -> str | None:
    """Suggest the nearest valid name, or None when nothing is close."""
    if not isinstance(word, str):
        return None
    pool = sorted(set(candidates))
    by_case = {c.lower(): c for c in pool}
    if word.lower() in by_case and by_case[word.lower()] != word:
        # Case slips are the most common typo and difflib under-rates them.
        return f"did you mean `{by_case[word.lower()]}`?"
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return None


def one_of(candidates: Iterable[str]) -> str:
    """Render an "expected" list for messages: `a`, `b` or `c`."""
    names = [f"`{c}`" for c in candidates]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " or " + names[-1]


class ErrorCollector:
    """Turns (key path, message) into MappingErrors with line numbers for one file."""

    def __init__(self, file: str, lines: Mapping[KeyPath, int] | None = None) -> None:
        self.file = file
        self.lines: Mapping[KeyPath, int] = lines or {}
        self.errors: list[MappingError] = []

    def line_of(self, path: KeyPath) -> int:
        # A missing key has no line of its own: report the nearest enclosing key.
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1

    def add(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        self.errors.append(MappingError(self.file, self.line_of(path), format_path(path), message, hint))

    def extend(self, errors: Iterable[MappingError]) -> None:
        self.errors.extend(errors)

    def __bool__(self) -> bool:
        return bool(self.errors)
