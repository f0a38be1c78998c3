"""The one table of CRM kinds. Each row names the kind's adapter class, its intake module
(a Flask blueprint plus the secret settings it checks) and the objects it accepts by
default. The adapter registry, the web app and the intake all read this table, so a new
CRM is one row here plus its own modules (docs/crms/adding-a-crm.md).

Modules are named, not imported, so that the CLI starts without loading every CRM
library; a misspelt name fails at start-up with the row named (see `load`)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType

from connector.config import ConfigError, ConnectionConfig, Settings
from connector.crm.base import CRMAdapter


@dataclass(frozen=True)
class CRMKind:
    name: str  # the kind in CRM_CONNECTIONS (`name=kind`)
    adapter: str  # "module:Class" of its CRMAdapter subclass
    intake: str  # module exposing `blueprint` and `SECRETS` (see webhooks/intake.py)
    default_objects: tuple[str, ...]  # accepted unless the connection sets NAME_OBJECTS

    def adapter_class(self) -> type[CRMAdapter]:
        module_name, _, class_name = self.adapter.partition(":")
        cls = getattr(load(module_name, self), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, CRMAdapter)):
            raise ImportError(
                f"CRM kind {self.name!r}: {self.adapter!r} is not a CRMAdapter class; "
                "fix its row in connector/crm/registry.py"
            )
        return cls

    def intake_module(self) -> ModuleType:
        return load(self.intake, self)


KINDS: dict[str, CRMKind] = {
    kind.name: kind
    for kind in (
        CRMKind(
            name="salesforce",
            adapter="connector.crm.salesforce:SalesforceAdapter",
            intake="webhooks.salesforce",
            default_objects=("Opportunity", "Account", "Contract", "Quote"),
        ),
        CRMKind(
            name="hubspot",
            adapter="connector.crm.hubspot:HubSpotAdapter",
            intake="webhooks.hubspot",
            default_objects=("deals", "companies", "contacts"),
        ),
        CRMKind(
            name="zoho",
            adapter="connector.crm.zoho:ZohoAdapter",
            intake="webhooks.zoho",
            default_objects=("Deals", "Accounts", "Contacts", "Quotes"),
        ),
        CRMKind(
            name="bitrix24",
            adapter="connector.crm.bitrix24:Bitrix24Adapter",
            intake="webhooks.bitrix24",
            default_objects=("deal", "company", "contact", "smart_process"),
        ),
        CRMKind(
            name="sandbox",
            adapter="connector.crm.sandbox:SandboxAdapter",
            intake="webhooks.standard",  # the sandbox sends Standard Webhooks (standardwebhooks.com)
            default_objects=("deal", "company", "contract"),
        ),
    )
}


def crm_kind(name: str) -> CRMKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown CRM kind {name!r} in CRM_CONNECTIONS; supported: {', '.join(sorted(KINDS))}"
        ) from None


def check_kinds(settings: Settings) -> None:
    """Every configured connection names a known kind (a ConfigError at start-up otherwise)."""
    for connection in settings.connections.values():
        crm_kind(connection.kind)


def load(module_name: str, kind: CRMKind) -> ModuleType:
    """Import a module a row names; a missing one is an error naming the row, never a skip."""
    try:
        return import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise  # the module exists but one of its own imports is missing
        raise ImportError(
            f"CRM kind {kind.name!r}: module {module_name!r} does not exist; "
            "fix its row in connector/crm/registry.py"
        ) from exc


def adapter_class(kind: str) -> type[CRMAdapter]:
    return crm_kind(kind).adapter_class()


def build_adapter(connection: ConnectionConfig, settings: Settings) -> CRMAdapter:
    return adapter_class(connection.kind).from_config(connection, settings)
