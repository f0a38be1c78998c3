"""Which adapter class serves which CRM kind. Imported lazily so a missing optional CRM
module never breaks the others."""

from __future__ import annotations

from importlib import import_module

from connector.config import ConfigError, ConnectionConfig, Settings
from connector.crm.base import CRMAdapter

ADAPTERS: dict[str, str] = {
    "salesforce": "connector.crm.salesforce:SalesforceAdapter",
    "hubspot": "connector.crm.hubspot:HubSpotAdapter",
    "zoho": "connector.crm.zoho:ZohoAdapter",
    "bitrix24": "connector.crm.bitrix24:Bitrix24Adapter",
    "sandbox": "connector.crm.sandbox:SandboxAdapter",
}


def adapter_class(kind: str) -> type[CRMAdapter]:
    try:
        module_name, _, class_name = ADAPTERS[kind].partition(":")
    except KeyError:
        raise ConfigError(f"unknown CRM kind {kind!r}; supported: {', '.join(sorted(ADAPTERS))}") from None
    return getattr(import_module(module_name), class_name)  # type: ignore[no-any-return]


def build_adapter(connection: ConnectionConfig, settings: Settings) -> CRMAdapter:
    cls = adapter_class(connection.kind)
    return cls.from_config(connection, settings)  # type: ignore[attr-defined,no-any-return]
