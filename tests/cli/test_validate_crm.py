"""`crm-approvals validate` checks mapped API names against the CRM's describe where the
connection has credentials, and skips connections without them."""

from __future__ import annotations

from pathlib import Path

import responses
from click.testing import CliRunner

from connector.cli import main

MAPPING = Path(__file__).parents[1] / "data" / "pipeline" / "deals.yaml"
SANDBOX = "http://sandbox.test"


def describe_body(names: list[str]) -> dict[str, object]:
    return {"fields": [{"name": n, "label": n, "type": "string", "updateable": True} for n in names]}


def run(env: dict[str, str], *args: str) -> object:
    return CliRunner().invoke(main, ["--env-file", "/dev/null", "validate", *args, str(MAPPING)], env=env)


SANDBOX_ENV = {"CRM_CONNECTIONS": "sandbox", "SANDBOX_API_TOKEN": "t0ken", "SANDBOX_URL": SANDBOX}
KNOWN = [
    "amount",
    "stage",
    "owner_id",
    "owner_manager_id",
    "company",
    "approval_status",
    "approval_expires_on",
]


@responses.activate
def test_unknown_api_field_is_reported_with_the_nearest_name() -> None:
    responses.get(
        f"{SANDBOX}/api/v1/objects/deal/describe", json=describe_body([*KNOWN, "approval_comments"])
    )
    result = run(SANDBOX_ENV)
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    assert "fields.comment" in result.output  # type: ignore[attr-defined]
    assert "approval_comments" in result.output  # type: ignore[attr-defined]  (did you mean)


@responses.activate
def test_every_mapped_field_known_to_the_crm_passes() -> None:
    responses.get(f"{SANDBOX}/api/v1/objects/deal/describe", json=describe_body([*KNOWN, "approval_comment"]))
    result = run(SANDBOX_ENV)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]


@responses.activate
def test_unreachable_crm_is_an_error_with_a_hint_and_no_crm_skips_it() -> None:
    responses.get(f"{SANDBOX}/api/v1/objects/deal/describe", status=503)
    result = run(SANDBOX_ENV)
    assert result.exit_code == 1
    assert "could not describe sandbox" in result.output and "--no-crm" in result.output  # type: ignore[attr-defined]
    assert run(SANDBOX_ENV, "--no-crm").exit_code == 0  # type: ignore[attr-defined]


def test_connection_without_credentials_is_checked_from_the_file_only() -> None:
    with responses.RequestsMock() as rsps:  # any HTTP call would fail the test
        result = run({"CRM_CONNECTIONS": "sandbox"})
        assert len(rsps.calls) == 0
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
