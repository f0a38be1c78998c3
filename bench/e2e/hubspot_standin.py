"""HubSpot's CRM API as our HubSpot adapter (connector/crm/hubspot.py) calls it, for the
bench/e2e stand-in (`--crm hubspot`): CRM v3 objects batch read and batch update (100 inputs a
call), search, properties, owners and teams, in HubSpot's documented response shapes
(BatchResponseSimplePublicObject, CollectionResponse...; the sources are in
docs/crms/hubspot.md). The counting is the stand-in's own (bench/e2e/crm_standin.py `Stats`).
"""

from __future__ import annotations

import re
from typing import Any

from bench.e2e.crm_standin import Answer, Stats

OBJECTS = re.compile(r"^/crm/v3/objects/(?P<type>[^/?]+)/(?P<action>batch/read|batch/update|search)$")
STARTED, COMPLETED = "2026-12-01T10:00:00.100Z", "2026-12-01T10:00:00.300Z"
# What a read answers for a property nobody wrote: the deal every webhook describes. A
# webhook carries one property (amount), so the worker must read the deal stage.
DEFAULTS = {"amount": "150000", "dealstage": "contractsent", "approval_status": None}
LIMIT = 100  # inputs per batch read or update call
JUDGED = "dealstage"  # only the worker's reads ask for it; drift repair reads what it wrote
PROPERTIES = {  # GET /crm/v3/properties/deals: the ones bench/e2e/mapping_hubspot.yaml names
    "amount": ("Amount", "number", "number"),
    "dealstage": ("Deal Stage", "enumeration", "radio"),
    "approval_status": ("Approval status", "string", "text"),
}


def simple_object(record_id: str, properties: dict[str, Any]) -> dict[str, Any]:
    """A SimplePublicObject: every property value a string or null."""
    return {
        "id": record_id,
        "properties": {"hs_object_id": record_id, **properties},
        "createdAt": "2026-10-01T09:00:00.000Z",
        "updatedAt": COMPLETED,
        "archived": False,
    }


def batch_response(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"status": "COMPLETE", "results": results, "startedAt": STARTED, "completedAt": COMPLETED}


def property_definition(name: str) -> dict[str, Any]:
    label, type_, field_type = PROPERTIES[name]
    return {
        "name": name,
        "label": label,
        "type": type_,
        "fieldType": field_type,
        "groupName": "dealinformation",
        "options": [],
        "calculated": False,
        "hasUniqueValue": False,
        "hidden": False,
        "formField": True,
        "modificationMetadata": {"archivable": True, "readOnlyDefinition": False, "readOnlyValue": False},
    }


class HubSpotApi:
    def get(self, path: str, stats: Stats) -> Answer | None:
        route = path.partition("?")[0]
        if route in ("/crm/v3/owners", "/crm/v3/owners/", "/settings/v3/users/teams"):
            return 200, {"results": []}  # no paging.next: the last page
        if route.startswith("/crm/v3/properties/"):
            return 200, {"results": [property_definition(name) for name in PROPERTIES]}
        return None

    def post(self, path: str, body: Any, stats: Stats) -> Answer | None:
        match = OBJECTS.match(path)
        if match is None:
            if path.startswith("/crm/v4/associations/"):  # no deal here has associations
                return 200, batch_response([])
            return None
        action = match["action"]
        if len(body.get("inputs") or ()) > LIMIT:  # as HubSpot refuses it
            return 400, {"status": "error", "category": "VALIDATION_ERROR",
                         "message": f"Batch input limit exceeded: at most {LIMIT} inputs",
                         "correlationId": "6c1d1f1e-8f0a-4b52-9d3c-3f3c2d9e0b11"}  # fmt: skip
        if action == "search":  # CollectionResponseWithTotalSimplePublicObject; nothing matches
            return 200, {"total": 0, "results": []}
        if action == "batch/read":
            properties = body["properties"]
            ids = [str(item["id"]) for item in body["inputs"]]
            found = stats.read(ids, properties, judged=JUDGED in properties, defaults=DEFAULTS)
            return 200, batch_response([simple_object(i, values) for i, values in found])
        inputs = body["inputs"]  # batch/update
        stats.write((str(item["id"]), item["properties"]) for item in inputs)
        return 200, batch_response([simple_object(str(i["id"]), i["properties"]) for i in inputs])
