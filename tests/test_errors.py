"""One error root (connector/errors.py): every exception class in connector/ and webhooks/
derives from it, each is retriable, fatal or neither on purpose, and the web layer has an
HTTP status for every error class its API answers."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import connector
import webhooks
from connector import errors
from connector.approvals.errors import (
    ActionRenderError,
    ApprovalError,
    ChainError,
    InvalidDecisionError,
    NotAnApproverError,
)
from connector.config import ConfigError
from connector.crm import errors as crm_errors
from connector.rules.coerce import CoercionError
from connector.rules.errors import MappingError, MappingLoadError
from connector.rules.templating import TemplateCompileError, TemplateRenderError
from connector.storage.approval_store import StaleRequestError
from webhooks.errors import ERROR_STATUS, WebhookError, http_status, refusal

# Importing these runs something (the CLI; Alembic's migration environment), so they are read
# instead: they must define no class at all.
NOT_IMPORTED = {"connector.__main__", "connector.storage.migrations.env"}


def module_names() -> list[str]:
    names = []
    for package in (connector, webhooks):
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(names)


def exception_classes() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for name in module_names():
        if name in NOT_IMPORTED:
            continue
        module = importlib.import_module(name)
        found += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException)
        ]
    return found


EXCEPTIONS = exception_classes()


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=qualified)
def test_every_exception_class_derives_from_the_root(cls: type[BaseException]) -> None:
    assert issubclass(cls, errors.CrmApprovalsError), (
        f"{qualified(cls)} must derive from connector.errors.CrmApprovalsError "
        "(or RetriableError / FatalError when the inbox should retry / dead-letter it)"
    )


def test_the_walk_finds_every_family() -> None:
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {
        "CRMError",
        "ApprovalError",
        "MappingLoadError",
        "TemplateCompileError",
        "TemplateRenderError",
        "ConfigError",
        "WebhookError",
        "CoercionError",
        "RecordError",
        "ApiError",
        "StaleRequestError",
        "RuleGoneError",
    } <= names


def test_modules_that_are_not_imported_define_no_class() -> None:
    root = Path(connector.__file__).resolve().parents[1]
    for name in NOT_IMPORTED:
        tree = ast.parse((root / (name.replace(".", "/") + ".py")).read_text())
        assert not [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)], name


@pytest.mark.parametrize(
    "cls",
    [
        crm_errors.RetriableError,
        crm_errors.RateLimitedError,
        crm_errors.AuthExpiredError,
        StaleRequestError,  # a concurrent change: reading the request again may succeed
    ],
    ids=qualified,
)
def test_retriable_classes(cls: type[BaseException]) -> None:
    assert issubclass(cls, errors.RetriableError) and not issubclass(cls, errors.FatalError)


@pytest.mark.parametrize(
    "cls",
    [
        crm_errors.FatalError,
        crm_errors.NotFoundError,
        crm_errors.AuthError,
        ChainError,
        ActionRenderError,
        MappingLoadError,
        TemplateCompileError,
        TemplateRenderError,
        CoercionError,
        ConfigError,
    ],
    ids=qualified,
)
def test_fatal_classes(cls: type[BaseException]) -> None:
    assert issubclass(cls, errors.FatalError) and not issubclass(cls, errors.RetriableError)


def test_no_class_is_both_retriable_and_fatal() -> None:
    both = [
        qualified(cls)
        for cls in EXCEPTIONS
        if issubclass(cls, errors.RetriableError) and issubclass(cls, errors.FatalError)
    ]
    assert both == []


def test_families_keep_their_other_bases_and_attributes() -> None:
    # Callers catch these as ValueError (settings parsing, coercion, decisions).
    assert issubclass(ConfigError, ValueError) and issubclass(CoercionError, ValueError)
    assert issubclass(InvalidDecisionError, ValueError)
    limited = crm_errors.RateLimitedError(
        "slow down", code="REQUEST_LIMIT_EXCEEDED", status=403, retry_after=7
    )
    assert (limited.code, limited.status, limited.retry_after, limited.message, limited.fields) == (
        "REQUEST_LIMIT_EXCEEDED",
        403,
        7,
        "slow down",
        (),
    )
    assert str(limited) == "HTTP 403: REQUEST_LIMIT_EXCEEDED: slow down"
    assert crm_errors.FatalError("no code").code is None  # the CRM gave none
    chain = ChainError("finance", "role 'finance'", "resolved to nobody")
    assert (chain.code, chain.step, str(chain)) == (
        "chain_error",
        "finance",
        "step 'finance': role 'finance': resolved to nobody",
    )
    loading = MappingLoadError([MappingError("deals.yaml", 3, "rules[0]", "bad", "fix it")])
    assert (loading.code, str(loading)) == ("mapping_error", "deals.yaml:3: rules[0]: bad; hint: fix it")
    assert ConfigError("QUEUE_URL is bad").code == "config_error"


# --- HTTP statuses, chosen in webhooks/errors.py only ------------------------------------------


def api_error_classes() -> list[type[BaseException]]:
    """What the approvals API answers: every engine error and the settings error."""
    return [cls for cls in EXCEPTIONS if issubclass(cls, ApprovalError) and cls is not ApprovalError] + [
        ConfigError
    ]


@pytest.mark.parametrize("cls", api_error_classes(), ids=qualified)
def test_the_status_table_covers_every_api_error_class(cls: type[errors.CrmApprovalsError]) -> None:
    assert any(issubclass(cls, listed) for listed, _status in ERROR_STATUS), (
        f"choose an HTTP status for {qualified(cls)} in webhooks/errors.py ERROR_STATUS"
    )


def test_no_status_attribute_outside_the_web_layer() -> None:
    """Statuses are chosen in the table; a class attribute elsewhere would be ignored."""
    for cls in EXCEPTIONS:
        if issubclass(cls, WebhookError) or cls.__module__.startswith("connector.sandbox"):
            continue  # the web layer's own refusal, and the sandbox CRM's own web API
        assert "status" not in vars(cls), qualified(cls)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ActionRenderError("status", ValueError("bad")), 503),  # an admin's template, not the voter
        (ConfigError("SANDBOX_WEBHOOK_SECRET is not set"), 503),
        (NotAnApproverError("not yours"), 403),
        (WebhookError(415, "unsupported_content_type", "send JSON"), 415),
    ],
)
def test_status_of(error: errors.CrmApprovalsError, status: int) -> None:
    assert http_status(error) == status


def test_refusal_carries_code_message_and_hint() -> None:
    answer = refusal(ChainError("finance", "role 'finance'", "resolved to nobody"), "fix the approvers")
    assert (answer.status, answer.to_json()) == (
        422,
        {
            "error": {
                "code": "chain_error",
                "message": "step 'finance': role 'finance': resolved to nobody",
                "hint": "fix the approvers",
            }
        },
    )


def test_an_error_without_a_status_is_a_logged_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    answer = refusal(errors.FatalError("an internal detail"))
    assert (answer.status, answer.to_json()) == (
        500,
        {"error": {"code": "internal_error", "message": "internal error"}},
    )
    assert "no HTTP status is chosen for FatalError" in caplog.text
