"""Approval sheets and generated documents: rendered by the worker's job after each vote,
stored, downloadable, attached to the record in the sandbox CRM as new versions of one file.
The PDFs' text is read back with pypdf."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import responses
from flask import Flask
from pypdf import PdfReader
from sqlalchemy import select

from connector.config import Settings
from connector.crm.base import CRMUser
from connector.documents import render as render_module
from connector.documents.models import RequestDocument
from connector.documents.render import DocumentRenderer, DocumentTemplateError
from connector.documents.service import DocumentJob, RunReport
from connector.runtime import Runtime
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from connector.sandbox.attachments import latest_attachments
from connector.sandbox.store import Store
from connector.storage.inbox import accept
from tests.sandbox.test_sandbox import forward_to
from tests.service.test_approval_service import webhook
from tests.web.helpers import ADMIN, seed_directory, signed_in, text, web_world
from tests.webhooks.test_api import BIG_DEAL_RULE, BOARD_RULE, World, write_mapping

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates" / "documents"
DOCUMENTS = """    documents:
      - {name: approval-sheet, template: approval_sheet.html, title: Approval sheet}
      - {name: contract, template: standard_contract.html, title: Standard contract, on: approve}
"""


def pdf_text(pdf: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def documents_world(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    **settings: Any,
) -> World:
    """The big-deal and board rules with the approval sheet and contract documents."""
    world = web_world(
        tmp_path,
        settings_factory,
        runtime_factory,
        env={"SANDBOX_DB_PATH": str(tmp_path / "sandbox.db")},
        documents_templates_dir=str(TEMPLATES),
        **settings,
    )
    rule = BIG_DEAL_RULE.replace("    on:\n", DOCUMENTS + "    on:\n", 1)
    write_mapping(world.mapping_file, rule, BOARD_RULE)
    world.pipeline.mappings.reload()
    assert not world.pipeline.mappings.errors
    return world


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return documents_world(tmp_path, settings_factory, runtime_factory)


@dataclass
class SandboxCRM:
    store: Store
    app: Flask


@pytest.fixture
def sandbox_crm(world: World, tmp_path: Path) -> Iterator[SandboxCRM]:
    """The sandbox CRM's real API, behind `responses` (what the adapter calls)."""
    config = SandboxConfig.from_settings(world.runtime.settings)
    store = Store(config.db_path)
    app = create_sandbox_app(config, store=store, start_delivery=False)
    base = world.runtime.settings.sandbox_url.rstrip("/")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        attachments = re.compile(rf"{re.escape(base)}/api/v1/objects/deal/[^/]+/attachments(/.*)?$")
        rsps.add_callback(responses.POST, attachments, callback=forward_to(app.test_client()))
        yield SandboxCRM(store, app)
    store.close()


def save_first_page(pdf: bytes, name: str, tmp_path: Path) -> None:
    """The PDF's first page as docs/screenshots/<name> (poppler's pdftoppm, `make pdf-deps`)."""
    if shutil.which("pdftoppm") is None:
        return
    source = tmp_path / "page.pdf"
    source.write_bytes(pdf)
    target = ROOT / "docs" / "screenshots" / name
    subprocess.run(
        [
            "pdftoppm",
            "-png",
            "-r",
            "80",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            str(source),
            str(target.with_suffix("")),
        ],
        check=True,
        timeout=60,
    )


def run_job(world: World) -> dict[str, int]:
    return DocumentJob(str(TEMPLATES))(world.runtime)


def document(world: World, request_id: str, name: str) -> RequestDocument:
    with world.runtime.sessions() as session:
        row = session.scalar(
            select(RequestDocument).where(
                RequestDocument.request_id == request_id, RequestDocument.name == name
            )
        )
        assert row is not None, f"no {name} for {request_id}"
        session.expunge(row)
        return row


def test_the_sheet_is_regenerated_after_each_vote_and_replaces_its_crm_file(
    world: World, sandbox_crm: SandboxCRM, tmp_path: Path
) -> None:
    request_id = world.submit("D-1001")
    assert run_job(world) == {"rendered": 1, "attached": 1, "failed": 0}
    first = document(world, request_id, "approval-sheet")
    text = pdf_text(first.pdf)
    assert "APPROVAL SHEET · VERSION 1" in text and "sandbox:deal:D-1001" in text and "No votes yet." in text
    assert first.version == 1 and first.crm_status == "attached" and first.filename == "approval-sheet v1.pdf"

    world.vote("u-mgr", request_id, comment="Margin is fine")
    assert run_job(world)["rendered"] == 1
    second = document(world, request_id, "approval-sheet")
    text = pdf_text(second.pdf)
    assert second.version == 2
    assert "u-mgr" in text and "APPROVE" in text and "Margin is fine" in text
    assert second.crm_ref == first.crm_ref  # the same CRM file, a new version of it

    assert run_job(world) == {"rendered": 0, "attached": 0, "failed": 0}  # nothing new: nothing done
    world.approve_steps(request_id, "u-gm", "u-fin-2")
    run_job(world)
    sheet = document(world, request_id, "approval-sheet")
    text = pdf_text(sheet.pdf)
    assert "Status: APPROVED" in text and "u-gm" in text and "u-fin-2" in text
    contract = pdf_text(document(world, request_id, "contract").pdf)
    assert "STANDARD CONTRACT" in contract and "150000" in contract and "u-fin-2" in contract

    save_first_page(sheet.pdf, "approval-sheet.png", tmp_path)

    on_record = {a["title"]: a for a in latest_attachments(sandbox_crm.store, "deal", "D-1001")}
    assert set(on_record) == {"Approval sheet", "Standard contract"}  # one file each, not one per vote
    assert on_record["Approval sheet"]["version"] == sheet.version
    assert on_record["Approval sheet"]["size"] == len(sheet.pdf)
    page = sandbox_crm.app.test_client().get("/deals/D-1001").get_data(as_text=True)
    assert "Approval sheet" in page and f"version {sheet.version}" in page
    download = sandbox_crm.app.test_client().get(f"/files/{on_record['Approval sheet']['id']}")
    assert download.status_code == 200 and download.data == sheet.pdf


def test_the_contract_waits_for_its_event(world: World, sandbox_crm: SandboxCRM) -> None:
    request_id = world.submit("D-1001")
    world.vote("u-mgr", request_id)
    run_job(world)
    with world.runtime.sessions() as session:
        names = set(
            session.scalars(select(RequestDocument.name).where(RequestDocument.request_id == request_id))
        )
    assert names == {"approval-sheet"}


def test_a_crm_outage_leaves_the_version_pending_for_the_next_run(world: World) -> None:
    request_id = world.submit("D-1001")
    with responses.RequestsMock() as rsps:
        body = {"error": {"code": "UNAVAILABLE", "message": "down for maintenance"}}
        rsps.add(responses.POST, re.compile(r".*/attachments$"), status=503, json=body)
        report = run_job(world)
    assert report["rendered"] == 1 and report["failed"] == 1
    row = document(world, request_id, "approval-sheet")
    assert row.crm_status == "pending" and "down for maintenance" in (row.crm_error or "")
    assert row.crm_next_attempt_at is not None


def test_rendering_holds_no_database_write_lock(
    world: World, sandbox_crm: SandboxCRM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the PDF is made, another writer stores a webhook (SQLite: any open transaction
    would hold the write lock and block it)."""
    world.submit("D-1001")
    stored: list[int] = []
    real = render_module.html_to_pdf

    def html_to_pdf_while_another_writes(html: str, base_dir: Path) -> bytes:
        thread = threading.Thread(
            target=lambda: stored.append(accept(world.runtime.sessions, [webhook(7)]).accepted)
        )
        thread.start()
        thread.join(5)
        return real(html, base_dir)

    monkeypatch.setattr(render_module, "html_to_pdf", html_to_pdf_while_another_writes)
    run_job(world)
    assert stored == [1]


# --- templates ------------------------------------------------------------------------------------


def test_template_errors_name_the_template_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "broken.html").write_text("<p>{{ record.nope.deeper }}</p>")
    (tmp_path / "loop.html").write_text(
        "{% for i in range(1000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}"
    )
    renderer = DocumentRenderer(tmp_path)
    with pytest.raises(
        DocumentTemplateError, match="'missing.html' not found in .*add the file or correct `template:`"
    ):
        renderer.render_html("missing.html", {})
    with pytest.raises(DocumentTemplateError, match="'broken.html'.*'record' is undefined"):
        renderer.render_html("broken.html", {})
    with pytest.raises(DocumentTemplateError, match="'loop.html' went over a limit"):
        renderer.render_html("loop.html", {})


def test_values_are_escaped_and_the_sandbox_blocks_internals(tmp_path: Path) -> None:
    (tmp_path / "t.html").write_text("<p>{{ name }}</p>{{ name.__class__.__mro__ }}")
    with pytest.raises(DocumentTemplateError):
        DocumentRenderer(tmp_path).render_html("t.html", {"name": "<script>x</script>"})
    (tmp_path / "ok.html").write_text("<p>{{ name }}</p>")
    assert DocumentRenderer(tmp_path).render_html("ok.html", {"name": "<b>"}) == "<p>&lt;b&gt;</p>"


def test_pdfs_read_no_file_outside_the_templates_folder(tmp_path: Path) -> None:
    secret = tmp_path / "secret.css"
    secret.write_text("body { color: red }")
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "t.html").write_text('<link rel="stylesheet" href="../secret.css"><p>Hello PDF</p>')
    fetched: list[str] = []
    fetcher_class = render_module._fetcher_class()
    fetch = fetcher_class.fetch

    def spy(self: Any, url: str, headers: Any = None) -> Any:
        try:
            return fetch(self, url, headers)
        except ValueError as exc:
            fetched.append(str(exc))
            raise

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetcher_class, "fetch", spy)
        rendered = DocumentRenderer(folder).render("t.html", {})
    assert "Hello PDF" in pdf_text(rendered.pdf)
    assert fetched and "outside the templates folder" in fetched[0]


# --- downloads ------------------------------------------------------------------------------------


def test_documents_are_listed_and_downloaded_by_who_may_see_the_request(
    world: World, sandbox_crm: SandboxCRM
) -> None:
    request_id = world.submit("D-1001")
    world.vote("u-mgr", request_id)
    run_job(world)
    sheet = document(world, request_id, "approval-sheet")

    listing = world.get("u-mgr", f"/requests/{request_id}/documents")
    assert listing.status_code == 200, listing.get_json()
    (item,) = listing.get_json()["documents"]
    # submitted and voted on before the worker ran: one render shows both
    assert (item["name"], item["version"], item["crm"]["status"]) == ("approval-sheet", 1, "attached")
    pdf = world.client.get(item["pdf"], headers=world.auth("u-rep"))  # the submitter
    assert pdf.status_code == 200 and pdf.mimetype == "application/pdf" and pdf.data == sheet.pdf
    html = world.client.get(item["html"], headers=world.auth("u-admin"))
    assert "u-mgr" in html.get_data(as_text=True) and "sandbox" in html.headers["Content-Security-Policy"]
    assert world.get("u-nobody", f"/requests/{request_id}/documents").status_code == 404
    missing = world.get("u-mgr", f"/requests/{request_id}/documents/contract.pdf")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "document_not_found"

    page = signed_in(world, "u-mgr").get(f"/app/requests/{request_id}")
    assert "Approval sheet" in text(page) and "version 1" in text(page) and "on the CRM record" in text(page)
    web_pdf = signed_in(world, ADMIN).get(f"/app/requests/{request_id}/documents/approval-sheet.pdf")
    assert web_pdf.status_code == 200 and web_pdf.data == sheet.pdf
    assert (
        signed_in(world, "u-nobody")
        .get(f"/app/requests/{request_id}/documents/approval-sheet.pdf")
        .status_code
        == 404
    )


def test_on_postgresql_too(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    pg_url: str,
) -> None:
    world = documents_world(tmp_path, settings_factory, runtime_factory, database_url=pg_url)
    request_id = world.submit("D-1001")
    world.vote("u-mgr", request_id, comment="Checked on PostgreSQL")
    with responses.RequestsMock() as rsps:  # the CRM is down: the document is kept, pending
        rsps.add(responses.POST, re.compile(r".*/attachments$"), status=503)
        assert run_job(world)["rendered"] == 1
    sheet = document(world, request_id, "approval-sheet")
    assert "Checked on PostgreSQL" in pdf_text(sheet.pdf) and sheet.crm_status == "pending"
    world.vote("u-gm", request_id)
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, re.compile(r".*/attachments$"), status=503)
        assert run_job(world)["rendered"] == 1
    assert document(world, request_id, "approval-sheet").version == 2


def test_a_broken_template_is_logged_and_tried_again_later_not_on_every_flush(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "broken-templates"
    folder.mkdir()
    (folder / "approval_sheet.html").write_text("<p>{{ request.nope.deeper }}</p>")
    (folder / "standard_contract.html").write_text("<p>fine</p>")
    now = [1000.0]
    job = DocumentJob(str(folder), clock=lambda: now[0])
    request_id = world.submit("D-1001")
    assert job(world.runtime)["failed"] == 1
    assert "approval_sheet.html" in caplog.text and "nope" in caplog.text
    assert job(world.runtime)["failed"] == 0  # not again at once
    (folder / "approval_sheet.html").write_text("<p>{{ request.id }}</p>")  # the admin fixes it
    now[0] += 601
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, re.compile(r".*/attachments$"), status=503)
        assert job(world.runtime)["rendered"] == 1
    assert request_id in pdf_text(document(world, request_id, "approval-sheet").pdf)


def test_people_are_named_by_the_user_directory(world: World) -> None:
    seed_directory(world.runtime, [CRMUser("u-mgr", "Boris Novak", email="boris@example.com")])
    request_id = world.submit("D-1001")
    world.vote("u-mgr", request_id, comment="ok")
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, re.compile(r".*/attachments$"), status=503)
        run_job(world)
    text_of_pdf = pdf_text(document(world, request_id, "approval-sheet").pdf)
    assert "Boris Novak" in text_of_pdf and "u-rep" in text_of_pdf  # u-rep: the directory's name is the id


def test_two_workers_storing_a_first_version_at_once_keep_one_and_raise_nothing(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    pg_url: str,
) -> None:
    """On PostgreSQL both workers' write transactions can read "no document yet" before
    either commits; the later INSERT then breaks uq_request_document. It was a unique-key
    error in a two-worker deployment's log: the later worker now stands back quietly."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    world = documents_world(tmp_path, settings_factory, runtime_factory, database_url=pg_url)
    request_id = world.submit("D-1001")
    first, second = DocumentJob(str(TEMPLATES)), DocumentJob(str(TEMPLATES))
    competed: list[dict[str, int]] = []

    def the_other_worker_commits_first(session: Session, *_: Any) -> None:
        if not competed and any(isinstance(row, RequestDocument) for row in session.new):
            competed.append({})  # once: the other worker's own flush comes through here too
            report = RunReport()
            first.render_due(world.runtime, report)  # between our read and our INSERT
            competed[0] = vars(report)

    event.listen(Session, "before_flush", the_other_worker_commits_first)
    try:
        report = RunReport()
        second.render_due(world.runtime, report)
    finally:
        event.remove(Session, "before_flush", the_other_worker_commits_first)
    assert competed == [{"rendered": 1, "attached": 0, "failed": 0}]
    assert (report.rendered, report.failed) == (0, 0)
    assert document(world, request_id, "approval-sheet").version == 1
    with responses.RequestsMock() as rsps:  # nothing left due to render (the CRM is not asked)
        rsps.add(responses.POST, re.compile(r".*/attachments$"), status=503)
        assert run_job(world)["rendered"] == 0
