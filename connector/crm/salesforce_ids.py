"""Salesforce record ids: checked and normalized to the 18-character form. Pure Python.

A Salesforce id is 15 case-sensitive characters, or those 15 plus a 3-character suffix that
encodes which of them are capitals (so that the 18-character form survives case-insensitive
tools). "001A0000006Vm9r" and "001a0000006vm9r" are two records; their 18-character forms
differ in the suffix. Normalizing every id we accept to the 18-character form means one record
always has one key, however the sender spelled it, and two records never share one.
"""

from __future__ import annotations

import re

_SUFFIX_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_SHAPE = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
HINT = "a Salesforce id is 15 letters and digits, or 18 whose last 3 encode the capitals of the first 15"


def checksum_suffix(id15: str) -> str:
    """The 3 characters Salesforce appends to a 15-character id: one per 5 characters, whose
    bits say which of those 5 are capital letters."""
    return "".join(
        _SUFFIX_ALPHABET[
            sum(1 << bit for bit, char in enumerate(id15[start : start + 5]) if "A" <= char <= "Z")
        ]
        for start in (0, 5, 10)
    )


def salesforce_id_problem(value: str) -> str | None:
    """What is wrong with `value` as a Salesforce id, or None."""
    if not _SHAPE.fullmatch(value):
        return f"{value[:40]!r} is not 15 or 18 letters and digits"
    if len(value) == 18 and value[15:].upper() != checksum_suffix(value[:15]):
        return (
            f"{value!r} has the checksum suffix {value[15:]!r}, but its first 15 characters give "
            f"{checksum_suffix(value[:15])!r}"
        )
    return None


def normalize_salesforce_id(value: str) -> str:
    """The 18-character form of a valid 15- or 18-character id; ValueError naming the problem."""
    problem = salesforce_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value[:15] + checksum_suffix(value[:15])


def id_spellings(record_id: str) -> set[str]:
    """`record_id` and, when it is a valid Salesforce id, its 18-character form: what a lookup of
    stored record ids (always the 18-character form for Salesforce) should match, whatever the
    CRM. Harmless elsewhere: another CRM's id never equals a Salesforce 18-character form."""
    try:
        return {record_id, normalize_salesforce_id(record_id)}
    except ValueError:
        return {record_id}
