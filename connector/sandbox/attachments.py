"""The sandbox CRM's files on records, like Salesforce Files: an attachment has versions; a
new version replaces what people see (the latest), the older ones stay in its history.

API (bearer token, as the rest of /api/v1):
  POST /api/v1/objects/<object>/<id>/attachments                 multipart `file` (+ `title`)
  POST /api/v1/objects/<object>/<id>/attachments/<att>/versions  multipart `file` (+ `title`)
  GET  /api/v1/objects/<object>/<id>/attachments                 the record's attachments
Pages: the record page lists them; /files/<att> downloads the latest version.
"""

from __future__ import annotations

import secrets
import weakref
from typing import Any

from flask import Response, abort, jsonify, request
from flask.typing import ResponseReturnValue

from connector.sandbox.app import NOT_FOUND, ApiError, _spec, api, pages, sandbox
from connector.sandbox.store import Store

MAX_BYTES = 10 * 1024 * 1024
_SQL = """
CREATE TABLE IF NOT EXISTS attachment_versions (
    id INTEGER PRIMARY KEY,
    attachment_id TEXT NOT NULL,
    object_type TEXT NOT NULL,
    record_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    title TEXT NOT NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content BLOB NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (attachment_id, version)
);
CREATE INDEX IF NOT EXISTS ix_attachment_record ON attachment_versions (object_type, record_id);
"""


_READY: weakref.WeakSet[Store] = weakref.WeakSet()


def _db(store: Store) -> None:
    """Create the table in this store once (stores made by older versions lack it)."""
    if store not in _READY:
        with store.reading() as db:
            db.executescript(_SQL)
        _READY.add(store)


def latest_attachments(store: Store, object_type: str, record_id: str) -> list[dict[str, Any]]:
    """Each attachment of the record at its latest version (no content)."""
    _db(store)
    with store.reading() as db:
        rows = db.execute(
            """SELECT attachment_id, MAX(version) AS version, COUNT(*) AS versions FROM attachment_versions
               WHERE object_type = ? AND record_id = ? GROUP BY attachment_id ORDER BY attachment_id""",
            (object_type, record_id),
        ).fetchall()
        found = []
        for row in rows:
            latest = db.execute(
                "SELECT title, filename, content_type, length(content) AS size, created_at"
                " FROM attachment_versions WHERE attachment_id = ? AND version = ?",
                (row["attachment_id"], row["version"]),
            ).fetchone()
            found.append({"id": row["attachment_id"], "version": row["version"], **dict(latest)})
        return found


def _upload() -> tuple[str, str, str, bytes]:
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise ApiError(400, "BAD_REQUEST", "send the file as multipart form field `file`")
    content = upload.read(MAX_BYTES + 1)
    if len(content) > MAX_BYTES:
        raise ApiError(413, "FILE_TOO_LARGE", f"files may have at most {MAX_BYTES} bytes")
    title = (request.form.get("title") or upload.filename).strip()[:255]
    return title, upload.filename[:255], upload.mimetype or "application/octet-stream", content


def _record(object_type: str, record_id: str) -> str:
    spec = _spec(object_type)
    if sandbox().store.get(spec.name, record_id) is None:
        raise ApiError(404, NOT_FOUND, f"{spec.name} {record_id!r} does not exist")
    return spec.name


def _insert(object_type: str, record_id: str, attachment_id: str, version: int) -> None:
    title, filename, content_type, content = _upload()
    store = sandbox().store
    _db(store)
    with store.transaction() as db:
        db.execute(
            "INSERT INTO attachment_versions (attachment_id, object_type, record_id, version, title,"
            " filename, content_type, content, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                attachment_id,
                object_type,
                record_id,
                version,
                title,
                filename,
                content_type,
                content,
                store.now(),
            ),
        )


@api.post("/objects/<object_type>/<record_id>/attachments")
def create_attachment(object_type: str, record_id: str) -> ResponseReturnValue:
    name = _record(object_type, record_id)
    attachment_id = f"ATT-{secrets.token_hex(6)}"
    _insert(name, record_id, attachment_id, 1)
    return jsonify(id=attachment_id, version=1), 201


@api.post("/objects/<object_type>/<record_id>/attachments/<attachment_id>/versions")
def new_version(object_type: str, record_id: str, attachment_id: str) -> ResponseReturnValue:
    name = _record(object_type, record_id)
    store = sandbox().store
    _db(store)
    with store.reading() as db:
        current = db.execute(
            "SELECT MAX(version) FROM attachment_versions WHERE attachment_id = ? AND object_type = ?"
            " AND record_id = ?",
            (attachment_id, name, record_id),
        ).fetchone()[0]
    if current is None:
        raise ApiError(404, NOT_FOUND, f"{name} {record_id!r} has no attachment {attachment_id!r}")
    _insert(name, record_id, attachment_id, current + 1)
    return jsonify(id=attachment_id, version=current + 1), 201


@api.get("/objects/<object_type>/<record_id>/attachments")
def list_attachments(object_type: str, record_id: str) -> ResponseReturnValue:
    name = _record(object_type, record_id)
    return jsonify(attachments=latest_attachments(sandbox().store, name, record_id))


@pages.get("/files/<attachment_id>")
def download(attachment_id: str) -> ResponseReturnValue:
    store = sandbox().store
    _db(store)
    with store.reading() as db:
        row = db.execute(
            "SELECT filename, content_type, content FROM attachment_versions WHERE attachment_id = ?"
            " ORDER BY version DESC LIMIT 1",
            (attachment_id,),
        ).fetchone()
    if row is None:
        abort(404, f"no attachment {attachment_id!r}")
    return Response(
        bytes(row["content"]),
        mimetype=row["content_type"],
        headers={"Content-Disposition": f'inline; filename="{row["filename"]}"'},
    )
