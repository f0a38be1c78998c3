"""Seed 001 end to end on the sandbox, with no mocks of our code (issue 12): a contract of a
company with no approval opens the company approval and waits; the sandbox's security check
answers "more documents" once and then "clear"; the company cascade approves; the contract
continues (duplicate check, product owners, lawyer) and ends approved; a second contract with
the same number is rejected as a duplicate, naming the first. The approved contract's approval
sheet (PDF) holds every vote and is attached to the sandbox record; `report` and `simulate`
run over the history this leaves."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import responses
from click.testing import CliRunner
from pypdf import PdfReader
from sqlalchemy import select

from connector.cli import main
from connector.documents.service import DocumentJob
from connector.rules import MappingSet
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from connector.sandbox.attachments import latest_attachments
from connector.sandbox.store import CONTRACT, Store
from connector.service import service_steps
from connector.storage.company_models import ServiceStepJob
from connector.storage.inbox import process_pending
from connector.storage.outbox import flush
from connector.wiring import attach_pipeline
from tests.cli.test_report_and_simulate import csv_sections
from tests.documents.conftest import require_weasyprint
from tests.e2e.test_end_to_end_sandbox import _token
from tests.sandbox.test_sandbox import API_TOKEN, Browser, forward_to

ROOT = Path(__file__).resolve().parents[2]


def contract_form(store: Store, contract_id: str, **changes: Any) -> dict[str, Any]:
    record = store.get("contract", contract_id) or {}
    form: dict[str, Any] = {}
    for f in CONTRACT.editable:
        value = record.get(f.name)
        form[f.name] = (
            list(value or []) if f.type == "multipicklist" else ("" if value is None else str(value))
        )
    form.update(changes)
    return form


def test_seed_001_company_dependency_security_check_and_duplicate(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    require_weasyprint()  # the approval sheet's PDF
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    for name in ("sandbox-company.yaml", "sandbox-contract.yaml"):
        shutil.copy(ROOT / "mappings/examples" / name, mappings)
    settings = settings_factory(
        env={"SANDBOX_API_TOKEN": API_TOKEN, "SANDBOX_DB_PATH": str(tmp_path / "sandbox.db")},
        mappings_dir=str(mappings),
        # the check step's ${SANDBOX_URL} and ${SANDBOX_API_TOKEN}, as Settings.from_env reads them
        variables={"SANDBOX_URL": "http://127.0.0.1:8001", "SANDBOX_API_TOKEN": API_TOKEN},
    )
    runtime = runtime_factory(settings)
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings))
    ours = app_factory(runtime).test_client()
    sandbox_app = create_sandbox_app(SandboxConfig.from_settings(settings), start_delivery=False)
    sandbox_app.test_client_class = Browser
    sandbox = sandbox_app.test_client()
    store = sandbox_app.extensions["sandbox"].store
    sender = sandbox_app.extensions["sandbox"].sender
    auth = {"Authorization": f"Bearer {API_TOKEN}"}

    documents = DocumentJob(settings.documents_templates_dir)

    def work() -> None:
        for _ in range(3):
            process_pending(runtime.sessions, pipeline)
            service_steps.run_due(runtime)
            flush(runtime.sessions, runtime.adapter)
            documents(runtime)
            if not sender.deliver_due():
                break

    def request_of(record_id: str, token: dict[str, str]) -> dict[str, Any]:
        """The record's newest request as the API lists it (status `waiting` included), in full."""
        kind = "contract" if record_id.startswith("K-") else "company"
        listed = ours.get(f"/api/v1/requests?record=sandbox:{kind}:{record_id}", headers=token).get_json()
        newest = listed["requests"][0]
        answer = ours.get(f"/api/v1/requests/{newest['id']}", headers=token)
        assert answer.status_code == 200, answer.get_json()
        assert answer.get_json()["status"] == newest["status"]
        return answer.get_json()  # type: ignore[no-any-return]

    def approve_current(request: dict[str, Any]) -> dict[str, Any]:
        voter = _token(runtime, request["current_step"]["approvers"][0])
        answer = ours.post(f"/api/v1/requests/{request['id']}/approve", json={"comment": "ok"}, headers=voter)
        assert answer.status_code == 200, answer.get_json()
        work()
        return request_of_id(request["id"])

    def request_of_id(request_id: str) -> dict[str, Any]:
        return ours.get(f"/api/v1/requests/{request_id}", headers=admin).get_json()  # type: ignore[no-any-return]

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(
            responses.POST, f"{settings.public_base_url}/webhooks/standard", callback=forward_to(ours)
        )
        for method in (responses.GET, responses.POST):
            rsps.add_callback(
                method,
                re.compile(re.escape(settings.sandbox_url) + "/(api|security-check).*"),
                forward_to(sandbox),
            )
        # The security check will ask for more documents once, then clear the company.
        verdicts = {"company_id": "C-500", "verdicts": ["more_documents", "clear"]}
        assert (
            sandbox.post(
                "/security-check/verdicts",
                data=json.dumps(verdicts),
                content_type="application/json",
                headers=auth,
            ).status_code
            == 200
        )

        # 1. A rep submits contract K-9001: its company C-500 has no approval yet.
        assert (
            sandbox.post(
                "/contracts/K-9001", data=contract_form(store, "K-9001", amount="125000")
            ).status_code
            == 303
        )
        work()
        admin = _admin(runtime)
        contract = request_of("K-9001", admin)
        assert contract["status"] == "waiting"
        assert "company-approval of company C-500" in contract["transitions"][-1]["comment"]
        company = request_of("C-500", admin)
        assert company["status"] == "pending" and company["current_step"]["name"] == "documents"

        # 2. Documents confirmed -> the security check asks for more -> back to documents.
        company = approve_current(company)
        assert company["current_step"]["name"] == "documents"
        sent_back = [t for t in company["transitions"] if t["kind"] == "sent_back"]
        assert "more documents" in sent_back[0]["comment"]
        # 3. Documents again -> the check clears -> the cascade.
        company = approve_current(company)
        cascade = []
        while company["status"] == "pending":
            cascade.append(company["current_step"]["name"])
            company = approve_current(company)
        assert cascade == ["chief-accountant", "lawyer", "commercial-director", "cfo"]
        assert company["status"] == "approved"
        assert store.get("company", "C-500")["approval_status"] == "Approved"

        # 4. The contract was released: unique number, product owners, lawyer.
        contract = request_of_id(contract["id"])
        assert any(t["kind"] == "resumed" for t in contract["transitions"])
        steps = []
        while contract["status"] == "pending":
            steps.append(contract["current_step"]["name"])
            contract = approve_current(contract)
        assert steps == ["products", "lawyer"] and contract["status"] == "approved"
        assert store.get("contract", "K-9001")["approval_status"] == "Approved"
        # its approval sheet holds every vote, downloadable and on the CRM record (one file)
        listing = ours.get(f"/api/v1/requests/{contract['id']}/documents", headers=admin).get_json()
        (sheet,) = listing["documents"]
        assert (sheet["name"], sheet["crm"]["status"]) == ("approval-sheet", "attached"), sheet
        pdf = ours.get(sheet["pdf"], headers=admin)
        assert pdf.status_code == 200 and pdf.mimetype == "application/pdf"
        text = " ".join("\n".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.data)).pages).split())
        assert len(contract["votes"]) >= 2
        votes = text[text.index("Votes") :]
        assert len(contract["votes"]) == len(steps)
        for step, vote in zip(steps, contract["votes"], strict=True):  # every vote, in order
            assert f"{step} {vote['approver']} APPROVE ok" in votes, (vote, votes)
        (on_record,) = [
            a for a in latest_attachments(store, "contract", "K-9001") if a["title"] == "Approval sheet"
        ]
        assert on_record["version"] == sheet["version"], (on_record, sheet)

        # 5. A second contract with the same number is rejected as a duplicate, naming the first.
        store.insert(
            "contract",
            {
                "id": "K-9002",
                "name": "Second supply agreement",
                "company_id": "C-500",
                "owner_id": "u-rep-felix",
                "product_lines": ["Hardware"],
            },
        )
        assert (
            sandbox.post(
                "/contracts/K-9002", data=contract_form(store, "K-9002", contract_number="2026/001")
            ).status_code
            == 303
        )
        work()
        second = request_of("K-9002", admin)
        assert second["status"] == "rejected"
        assert (
            "2026/001 is already used by contract Adventure Works supply agreement (K-9001)"
            in second["transitions"][-1]["comment"]
        )
        assert store.get("contract", "K-9002")["approval_status"] == "Rejected"
        # the sandbox page lists contracts with their approval
        page = sandbox.get("/").get_data(as_text=True)
        contracts = page[page.index('id="contracts"') :]
        assert re.search(r'K-9001</a>.*?class="badge ok">Approved<', contracts, re.S)
        assert re.search(
            r'K-9002</a>.*?class="badge bad">Rejected<.*?already used by contract', contracts, re.S
        )

    with runtime.sessions() as session:
        jobs = session.scalars(select(ServiceStepJob).order_by(ServiceStepJob.id)).all()
        assert [(j.kind, j.status) for j in jobs] == [
            ("check", "done"),
            ("check", "done"),
            ("duplicate", "done"),
            ("duplicate", "done"),
        ]

    # `report` and `simulate` over this history (issue 12's "Done when")
    env = tmp_path / ".env"
    env.write_text(f"DATABASE_URL={runtime.settings.database_url}\nQUEUE_URL=memory://\n")

    def cli(*args: str) -> Any:
        result = CliRunner().invoke(main, ["--env-file", str(env), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    sections = csv_sections(cli("report", "--csv"))
    rules = {row["RULE"]: row for row in sections["rules"]}
    company_rule, contract_rule = rules["company-approval"], rules["contract-approval"]
    assert (company_rule["SUBMITTED"], company_rule["APPROVED"], company_rule["PASS"]) == ("1", "1", "1.0000")
    assert (contract_rule["SUBMITTED"], contract_rule["APPROVED"], contract_rule["REJECTED"]) == (
        "2",
        "1",
        "1",
    )
    steps = {(row["RULE"], row["STEP"]): row for row in sections["steps"]}
    for name in ("chief-accountant", "lawyer", "commercial-director", "cfo"):
        assert (steps["company-approval", name]["ENTERED"], steps["company-approval", name]["APPROVED"]) == (
            "1",
            "1",
        )
    people = {row["APPROVER"]: row for row in sections["approvers"]}
    assert people["u-legal-eva"]["VOTES"] == "2"  # the company's lawyer step and the contract's final one

    # a proposed mapping without the product owners' step: K-9001 goes to another chain
    proposed = tmp_path / "proposed"
    shutil.copytree(mappings, proposed)
    contract_file = proposed / "sandbox-contract.yaml"
    text = contract_file.read_text()
    start, end = text.index("      - name: products"), text.index("      - name: lawyer")
    contract_file.write_text(text[:start] + text[end:])
    out = cli("simulate", "--mappings", str(proposed), "--since", "1d")
    contract_part = out.split("rule contract-approval")[1]
    assert "sent by both, to another chain" in contract_part and "sandbox:contract:K-9001" in contract_part, (
        out
    )


def _admin(runtime: Any) -> dict[str, str]:
    from connector.storage.db import transaction
    from connector.storage.tokens import create_token

    with transaction(runtime.sessions) as session:
        _info, token = create_token(session, "ops-admin", is_admin=True)
    return {"Authorization": f"Bearer {token}"}
