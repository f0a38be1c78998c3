"""/api/v1/dead-letters: the dead letters for admins (admin API token only).

    GET  /api/v1/dead-letters                 list; filters connection, object, code, kind,
                                              older_than, newer_than, state; limit, offset
    GET  /api/v1/dead-letters/<id>            one, with the CRM's message and the payload
    POST /api/v1/dead-letters/<id>/retry      retry one      (body optional: {"dry_run": true})
    POST /api/v1/dead-letters/<id>/discard    discard one
    POST /api/v1/dead-letters/retry           retry by {"ids": [...]} or filters, or {"all": true}
    POST /api/v1/dead-letters/discard         discard likewise

Retry queues the work and nudges the worker, which sends and processes it; the logic is
connector/service/dead_letters.py, shared with `crm-approvals dead-letters`. Docs: docs/api.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from connector.service import dead_letters as service
from connector.service.request_query import DEFAULT_LIMIT, MAX_LIMIT
from connector.storage.dead_letters import KINDS, STATES, DeadLetterFilter
from webhooks.api import authenticate, caller, nudge_write_back, on_api_error
from webhooks.errors import WebhookError, bad_request
from webhooks.intake import intake, json_body, require_content_type, whole_number

MAX_ID = 2**31 - 1  # the id column is a 32-bit integer: a larger number is no dead letter (404)
blueprint = Blueprint("dead_letters_api", __name__, url_prefix="/api/v1/dead-letters")
blueprint.register_error_handler(WebhookError, on_api_error)

FILTERS = ("connection", "object", "code", "kind", "older_than", "newer_than")
LIST_PARAMS = (*FILTERS, "state", "limit", "offset")
BULK_FIELDS = (*FILTERS, "ids", "all", "dry_run")
AGE_HINT = "e.g. older_than=2h; units s, m (minutes), h, d, w"


@blueprint.before_request
def admins_only() -> None:
    authenticate()
    if not caller().is_admin:
        raise WebhookError(
            403,
            "admin_only",
            "dead letters are for admins",
            "use a token created with `crm-approvals token create --admin`",
        )


@blueprint.get("")
def list_dead_letters() -> ResponseReturnValue:
    args = request.args
    _reject_unknown(args, LIST_PARAMS, "query parameter")
    state = args.get("state", "open")
    if state not in STATES:
        raise bad_request("invalid_state", f"state must be one of {', '.join(STATES)}, got {state!r}")
    limit = _whole(args.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _whole(args.get("offset"), "offset", 0, 0, None)
    where = _filter(args, state=state)
    page = service.list_letters(intake().runtime.sessions, where, limit=limit, offset=offset)
    next_offset = offset + len(page.items) if offset + len(page.items) < page.total else None
    return jsonify(
        dead_letters=[service.letter_json(letter) for letter in page.items],
        count=len(page.items),
        total=page.total,
        limit=limit,
        offset=offset,
        next_offset=next_offset,
    )


@blueprint.get(f"/<int(max={MAX_ID}):letter_id>")
def show_dead_letter(letter_id: int) -> ResponseReturnValue:
    letter = service.get_letter(intake().runtime.sessions, letter_id)
    if letter is None:
        raise _not_found(letter_id)
    return jsonify(service.letter_json(letter))


@blueprint.post(f"/<int(max={MAX_ID}):letter_id>/<verb>")
def act_on_one(letter_id: int, verb: str) -> ResponseReturnValue:
    body = _body(("dry_run",))
    if service.get_letter(intake().runtime.sessions, letter_id) is None:
        raise _not_found(letter_id)
    return _act(verb, DeadLetterFilter(ids=(letter_id,)), _flag(body, "dry_run"))


@blueprint.post("/<verb>")
def act_on_many(verb: str) -> ResponseReturnValue:
    body = _body(BULK_FIELDS)
    ids = body.get("ids", [])
    # Beyond the id column's range the database would refuse the query, not just find nothing.
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= MAX_ID for i in ids
    ):
        raise bad_request(
            "invalid_ids", f"`ids` must be a list of dead-letter ids (numbers 1..{MAX_ID})", '{"ids": [3, 4]}'
        )
    where = _filter(body, ids=tuple(ids))
    if not where.narrows and not _flag(body, "all"):
        raise bad_request(
            "no_selection",
            f"say which dead letters to {verb}",
            f'send ids or filters ({", ".join(FILTERS)}), or {{"all": true}} for every open one',
        )
    return _act(verb, where, _flag(body, "dry_run"))


def _act(verb: str, where: DeadLetterFilter, dry_run: bool) -> ResponseReturnValue:
    if verb not in ("retry", "discard"):
        raise WebhookError(
            404, "unknown_action", f"no dead-letter action {verb!r}", "POST to .../retry or .../discard"
        )
    state = intake()
    act = service.retry if verb == "retry" else service.discard
    actions = act(state.runtime.sessions, where, dry_run=dry_run)
    if verb == "retry" and not dry_run and any(a.action == "requeued" for a in actions):
        _nudge_worker()
    return jsonify(results=[service.action_json(a) for a in actions], dry_run=dry_run)


def _nudge_worker() -> None:
    tasks = intake().tasks
    if tasks is not None:
        tasks.nudge()  # re-run events
    nudge_write_back(tasks)  # send re-queued write-backs


# --- reading arguments ----------------------------------------------------------------


def _filter(source: Mapping[str, Any], *, ids: tuple[int, ...] = (), state: str = "open") -> DeadLetterFilter:
    values: dict[str, Any] = {}
    for name in ("connection", "object", "code", "kind"):
        value = source.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip() or "\x00" in value):
            raise bad_request(
                f"invalid_{name}", f"`{name}` must be a non-empty string without NUL characters"
            )
        values[name] = value.strip() if value is not None else None
    if values["kind"] is not None and values["kind"] not in KINDS:
        raise bad_request("invalid_kind", f"kind must be one of {', '.join(KINDS)}, got {values['kind']!r}")
    ages = {}
    for name in ("older_than", "newer_than"):
        if source.get(name) is not None:
            try:
                ages[name] = service.parse_age(str(source[name]))
            except ValueError as exc:
                raise bad_request(f"invalid_{name}", str(exc), AGE_HINT) from None
    return DeadLetterFilter(
        ids=ids,
        kind=values["kind"],
        connection=values["connection"],
        object_type=values["object"],
        code=values["code"],
        state=state,
        **ages,
    )


def _body(allowed: tuple[str, ...]) -> dict[str, Any]:
    if not request.get_data(cache=True):
        return {}
    require_content_type("application/json")
    body = json_body()
    if not isinstance(body, dict):
        raise bad_request("invalid_body", f"the body must be a JSON object, got {type(body).__name__}")
    _reject_unknown(body, allowed, "field")
    return body


def _reject_unknown(given: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise bad_request(
            f"unknown_{what.replace(' ', '_')}",
            f"unknown {what}(s): {', '.join(unknown)}",
            f"allowed: {', '.join(allowed)}",
        )


def _whole(raw: str | None, name: str, default: int, low: int, high: int | None) -> int:
    if raw is None:
        return default
    number = whole_number(raw)
    if number is None or number < low or (high is not None and number > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise bad_request(f"invalid_{name}", f"{name} must be a whole number {bounds}, got {raw[:40]!r}")
    return number


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"invalid_{name}", f"`{name}` must be true or false, got {value!r}")
    return value


def _not_found(letter_id: int) -> WebhookError:
    return WebhookError(
        404, "dead_letter_not_found", f"no dead letter {letter_id}", "list them with GET /api/v1/dead-letters"
    )
