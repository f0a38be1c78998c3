"""The OpenAPI 3.1 document of /api/v1, generated from the routes themselves.

Every Flask route under /api/v1 is in the document: path, method, path parameters and the
view's docstring come from the app's URL map, so a route registered the normal way
(`@blueprint.get(...)`) appears without anything else. `@operation(...)` under the route
decorator describes the rest *and enforces it*: the query string, path parameters and JSON
body are validated with the pydantic models it names (a bad value is a 400 naming it, an
unknown parameter or field too), a view that returns a model is answered with that model's
JSON, and the models' JSON Schemas are the document's schemas. What is described is
therefore what runs. How to describe a new route: docs/api.md#describing-a-route.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from inspect import cleandoc
from typing import Any, Literal, get_origin

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from webhooks.errors import bad_request
from webhooks.intake import json_body, require_content_type

API_PREFIX = "/api/v1"
SCHEMA_REF = "#/components/schemas/{model}"
_ATTRIBUTE = "__api_operation__"

# Why a query parameter that does not exist is refused, when there is more to say than that.
UNKNOWN_PARAMETER_HINTS = {
    "offset": "offset paging is not supported (it skips or repeats rows while requests change): "
    "pass cursor=<next_cursor of the previous page> instead",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    hint: str | None = None


class Error(BaseModel):
    """Every refusal: what was wrong, where, and how to fix it."""

    error: ErrorDetail


@dataclass(frozen=True)
class Operation:
    """What `@operation` records about a view; read by the validation wrapper and the document."""

    query: type[BaseModel] | None = None
    path: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    errors: Mapping[int, str] = field(default_factory=dict)
    auth: bool = True


def operation(
    *,
    query: type[BaseModel] | None = None,
    path: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    errors: Mapping[int, str] | None = None,
    auth: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., ResponseReturnValue]]:
    """Describe and enforce a route's input and output; put it *under* `@blueprint.get/post(...)`.

    query: the query string's model; the view gets it validated as `query=`.
    path: a model of the path parameters (to restrict them, e.g. to an enum); validated.
    body: the optional JSON body's model; the view gets it validated as `body=`.
    response: the 200 answer's model; a view returning an instance is answered with its JSON.
    errors: status -> what it means, for statuses the view itself can answer (401, and the 400s,
        404s, 413s and 415s of the checks above, are added by themselves).
    auth: False for the few routes anyone may call (this document).
    """
    for model in (query, body):
        if model is not None and model.model_config.get("extra") != "forbid":
            raise TypeError(
                f"{model.__name__}: give it model_config = ConfigDict(extra='forbid'), so an unknown "
                "parameter or field is refused (a typo must not be ignored) and the document says so"
            )
    described = Operation(query, path, body, response, dict(errors or {}), auth)

    def decorate(view: Callable[..., Any]) -> Callable[..., ResponseReturnValue]:
        @functools.wraps(view)
        def run(**path_args: Any) -> ResponseReturnValue:
            _refuse_nul(path_args)
            if described.path is not None:
                checked = _validate(described.path, path_args, "path")
                path_args = {name: getattr(checked, name) for name in path_args}
            if described.query is not None:
                path_args["query"] = _validate(described.query, _query_args(described.query), "query")
            if described.body is not None:
                path_args["body"] = _body(described.body)
            answer = view(**path_args)
            if isinstance(answer, BaseModel):
                return jsonify(answer.model_dump(mode="json"))
            return answer

        setattr(run, _ATTRIBUTE, described)
        return run

    return decorate


def requires_token(view: Callable[..., Any] | None) -> bool:
    described = getattr(view, _ATTRIBUTE, None)
    return described is None or described.auth


# --- reading and checking the input ----------------------------------------------------


def _query_args(model: type[BaseModel]) -> dict[str, Any]:
    unknown = sorted(set(request.args) - set(model.model_fields))
    if unknown:
        hints = [UNKNOWN_PARAMETER_HINTS[name] for name in unknown if name in UNKNOWN_PARAMETER_HINTS]
        raise bad_request(
            "unknown_parameter",
            f"unknown query parameter(s): {', '.join(unknown)}",
            "; ".join(hints) or f"allowed: {', '.join(model.model_fields)}",
        )
    values: dict[str, Any] = {}
    for name in request.args:
        given = request.args.getlist(name)
        _refuse_nul({name: given})
        if get_origin(model.model_fields[name].annotation) is list:
            values[name] = given
        elif len(given) > 1:
            raise bad_request(f"invalid_{name}", f"`{name}` is given {len(given)} times; give it once")
        else:
            values[name] = given[0]
    return values


def _body(model: type[BaseModel]) -> BaseModel:
    """The JSON object of a request; no body at all means every field's default (a model with
    required fields then refuses it, naming them, as for `{}`)."""
    if not request.get_data(cache=True):
        return _validate(model, {}, "body")
    require_content_type("application/json")
    data = json_body()
    if not isinstance(data, dict):
        raise bad_request(
            "invalid_body", f"the body must be a JSON object, got {type(data).__name__}", _example(model)
        )
    body = _validate(model, data, "body")
    _refuse_nul(body.model_dump())
    return body


def _validate(model: type[BaseModel], values: dict[str, Any], where: Literal["path", "query", "body"]) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _refusal(model, exc, where) from None


def _refusal(model: type[BaseModel], exc: ValidationError, where: str) -> Exception:
    errors = exc.errors()
    extra = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        return bad_request(
            "unknown_field", f"unknown field(s): {', '.join(extra)}", f"allowed: {sorted(model.model_fields)}"
        )
    first = errors[0]
    name = str(first["loc"][0]) if first["loc"] else where
    message = first["msg"].removeprefix("Value error, ")
    label = "query parameter" if where == "query" else "field" if where == "body" else "path parameter"
    given = f", got {_short(first['input'])}" if first["type"] != "missing" and where != "path" else ""
    described = model.model_fields[name].description if name in model.model_fields else None
    hint = f"`{name}`: {described}" if described else None
    return bad_request(f"invalid_{name}", f"{label} `{name}`: {message}{given}", hint)


def _refuse_nul(values: Mapping[str, Any]) -> None:
    """No database takes NUL in text (PostgreSQL refuses it outright), so neither does the API."""
    for name, value in values.items():
        if _has_nul(value):
            raise bad_request(f"invalid_{name}", f"`{name}` contains a NUL character")


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _example(model: type[BaseModel]) -> str | None:
    examples = (model.model_json_schema().get("examples") or [None])[0]
    return json.dumps(examples) if examples is not None else None


# --- the document -----------------------------------------------------------------------


def openapi_document(app: Flask) -> dict[str, Any]:
    """The document for `app`, built once (the URL map does not change after start-up)."""
    cached = app.extensions.get("crm_approvals_openapi")
    if cached is None:
        cached = app.extensions["crm_approvals_openapi"] = _build(app)
    return cached


@dataclass(frozen=True)
class _Route:
    path: str  # OpenAPI template: /api/v1/requests/{request_id}
    method: str
    endpoint: str
    view: Callable[..., Any]
    converters: dict[str, str]  # path parameter -> werkzeug converter name ("default", "int", ...)
    described: Operation | None


_PLACEHOLDER = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")  # werkzeug's <converter(args):name>


def _routes(app: Flask) -> list[_Route]:
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX + "/"):
            continue
        view = app.view_functions[rule.endpoint]
        converters = {name: kind or "default" for kind, name in _PLACEHOLDER.findall(rule.rule)}
        template = _PLACEHOLDER.sub(r"{\2}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append(
                _Route(
                    template, method.lower(), rule.endpoint, view, converters, getattr(view, _ATTRIBUTE, None)
                )
            )
    return sorted(routes, key=lambda r: (r.path, r.method))


def _build(app: Flask) -> dict[str, Any]:
    routes = _routes(app)
    described = [r.described for r in routes if r.described is not None]
    inputs = {m for d in described for m in (d.query, d.path, d.body) if m is not None}
    outputs = {d.response for d in described if d.response is not None} | {Error}
    keyed = [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)] + [
        (m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)
    ]
    refs, top = models_json_schema(keyed, ref_template=SCHEMA_REF)  # type: ignore[arg-type]
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    # A parameter model's fields become parameters; the model itself is no component.
    parameter_fields = {
        m: schemas.pop(refs[(m, "validation")]["$ref"].rsplit("/", 1)[-1]).get("properties", {})
        for m in {m for d in described for m in (d.query, d.path) if m is not None}
    }
    paths: dict[str, dict[str, Any]] = {}
    ids = [r.endpoint.rsplit(".", 1)[-1] for r in routes]
    for route, op_id in zip(routes, ids, strict=True):
        unique_id = op_id if ids.count(op_id) == 1 else f"{route.endpoint.replace('.', '_')}_{route.method}"
        entry: dict[str, Any] = {"operationId": unique_id, **_texts(route.view)}
        entry["parameters"] = _parameters(route, parameter_fields)
        op = route.described
        if op is not None and op.body is not None:
            entry["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
            }
        entry["responses"] = _responses(route, refs)
        if op is not None and not op.auth:
            entry["security"] = []
        paths.setdefault(route.path, {})[route.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crm-approvals API",
            "version": _version(),
            "description": "Approval requests: list, read, approve, reject, recall. Guide: docs/api.md. "
            "Every call but this document needs `Authorization: Bearer <token>`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token from `crm-approvals token create --user USER_ID`.",
                }
            },
        },
        "security": [{"bearer": []}],
    }


def _texts(view: Callable[..., Any]) -> dict[str, str]:
    doc = cleandoc(view.__doc__ or "")
    if not doc:
        return {}
    summary, _, rest = doc.partition("\n")
    return {"summary": summary.strip(), **({"description": rest.strip()} if rest.strip() else {})}


PATH_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "int": {"type": "integer", "minimum": 0},
    "float": {"type": "number", "minimum": 0},
    "uuid": {"type": "string", "format": "uuid"},
    "path": {"type": "string", "minLength": 1},
}
STRING_SEGMENT: dict[str, Any] = {"type": "string", "pattern": "^[^/]+$"}  # werkzeug's default converter


def _parameters(route: _Route, fields: Mapping[type[BaseModel], dict[str, Any]]) -> list[dict[str, Any]]:
    op = route.described
    own = fields[op.path] if op is not None and op.path is not None else {}
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": _without_null(own.get(name) or PATH_CONVERTER_SCHEMAS.get(converter, STRING_SEGMENT)),
        }
        for name, converter in route.converters.items()
    ]
    if op is None or op.query is None:
        return parameters
    for name, info in op.query.model_fields.items():
        schema = _without_null(fields[op.query][name])
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": info.is_required()}
        if info.description:
            parameter["description"] = info.description
        if schema.get("type") == "array":
            parameter.update(style="form", explode=True)
        parameters.append({**parameter, "schema": schema})
    return parameters


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`X | None` fields are optional parameters; a parameter is never sent as JSON null."""
    options = schema.get("anyOf")
    if not options:
        return {k: v for k, v in schema.items() if k not in ("title", "description")}
    kept = [o for o in options if o != {"type": "null"}]
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "title", "description", "default")}
    if len(kept) == 1:
        return {**kept[0], **rest}
    return {"anyOf": kept, **rest}


def _responses(route: _Route, refs: Mapping[Any, Any]) -> dict[str, Any]:
    def refused(text: str) -> dict[str, Any]:
        return {
            "description": text,
            "content": {"application/json": {"schema": refs[(Error, "serialization")]}},
        }

    op = route.described
    if op is None:
        return {
            "2XX": {
                "description": "Not described yet: docs/api.md#describing-a-route.",
                "content": {"application/json": {"schema": {}}},
            },
            "default": refused("A refusal."),
        }
    ok = refs[(op.response, "serialization")] if op.response is not None else {"type": "object"}
    codes: dict[int, list[str]] = {status: [text] for status, text in op.errors.items()}
    if op.auth:
        codes.setdefault(401, []).append("missing_token, invalid_authorization, invalid_token, revoked_token")
    if op.query or op.path:
        codes.setdefault(400, []).append("invalid_<parameter>, unknown_parameter")
    if op.body:
        codes.setdefault(400, []).append("malformed_json, invalid_body, unknown_field, invalid_<field>")
        codes.setdefault(413, []).append("body_too_large")
        codes.setdefault(415, []).append("unsupported_content_type")
    if route.converters:
        codes.setdefault(400, []).append("invalid_<parameter> (a NUL character)")
        codes.setdefault(404, []).append("no such path")
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": ok}}}
    }
    for status in sorted(codes):
        responses[str(status)] = refused("; ".join(codes[status]))
    return responses


def _version() -> str:
    try:
        return version("crm-approvals")
    except PackageNotFoundError:
        return "0.0.0"
