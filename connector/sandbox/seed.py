"""Seed data: a sales team, a few companies of varying credit, and deals that exercise
typical approval rules (big amounts, long terms, discounts on services, weak credit)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from connector.sandbox.store import Store

# Locales show the notification languages: English, Polish and Simplified Chinese.
USERS: list[dict[str, Any]] = [
    {"id": "u-rep-anna", "name": "Anna Kowalski", "role": "Sales representative",
     "email": "anna.kowalski@sandbox.example", "locale": "pl_PL", "manager_id": "u-mgr-boris"},
    {"id": "u-rep-felix", "name": "Felix Moreau", "role": "Sales representative",
     "email": "felix.moreau@sandbox.example", "locale": "en_GB", "manager_id": "u-mgr-boris"},
    {"id": "u-mgr-boris", "name": "Boris Novak", "role": "Sales manager",
     "email": "boris.novak@sandbox.example", "locale": "en_US", "manager_id": "u-gm-carla"},
    {"id": "u-gm-carla", "name": "Carla Rossi", "role": "General manager",
     "email": "carla.rossi@sandbox.example", "locale": "zh_CN", "manager_id": None},
    {"id": "u-fin-dmitri", "name": "Dmitri Volkov", "role": "Finance controller",
     "email": "dmitri.volkov@sandbox.example", "locale": "en_US", "manager_id": "u-gm-carla"},
    {"id": "u-legal-eva", "name": "Eva Lindqvist", "role": "Legal counsel",
     "email": "eva.lindqvist@sandbox.example", "locale": "pl_PL", "manager_id": "u-gm-carla"},
    # seed 001's company cascade: Chief Accountant -> Lawyer -> Commercial Director -> CFO
    {"id": "u-acc-greta", "name": "Greta Hansen", "role": "Chief Accountant",
     "email": "greta.hansen@sandbox.example", "locale": "en_GB", "manager_id": "u-cfo-hugo"},
    {"id": "u-com-ivan", "name": "Ivan Petrov", "role": "Commercial Director",
     "email": "ivan.petrov@sandbox.example", "locale": "en_US", "manager_id": "u-gm-carla"},
    {"id": "u-cfo-hugo", "name": "Hugo Martin", "role": "Chief Financial Officer",
     "email": "hugo.martin@sandbox.example", "locale": "en_US", "manager_id": "u-gm-carla"},
]  # fmt: skip

# Queues of approvers ({queue: Finance desk} in a mapping file): members are user ids.
QUEUES: list[dict[str, Any]] = [
    {"id": "q-finance", "name": "Finance desk", "members": "u-fin-dmitri;u-gm-carla"},
    {"id": "q-legal", "name": "Legal", "members": "u-legal-eva"},
]

COMPANIES: list[dict[str, Any]] = [
    {"id": "C-100", "name": "Northwind Traders GmbH", "credit_score": 82},
    {"id": "C-200", "name": "Contoso Retail Ltd", "credit_score": 64},
    {"id": "C-300", "name": "Fabrikam Industries AG", "credit_score": 91},
    {"id": "C-400", "name": "Tailspin Logistics BV", "credit_score": 58},
    {
        "id": "C-500",
        "name": "Adventure Works Sp. z o.o.",
        "credit_score": 73,
        "tax_id": "PL5260250274",
        "owner_id": "u-rep-felix",
    },
]
# Seed 001: contracts of a company that has no approval yet (the first one waits for it).
CONTRACTS: list[dict[str, Any]] = [
    {
        "id": "K-9001",
        "name": "Adventure Works supply agreement",
        "contract_number": "2026/001",
        "contract_type": "Supply",
        "amount": 120000,
        "company_id": "C-500",
        "owner_id": "u-rep-felix",
        "product_lines": ["Hardware", "Support"],
    },
]

# (id, name, amount, currency, stage, owner, company, product lines, term, days until close)
_DEALS: list[tuple[str, str, int, str, str, str, str, list[str], int, int]] = [
    ("D-1001", "Northwind ERP roll-out", 185000, "EUR", "Negotiation", "u-rep-anna", "C-100",
     ["Software", "Services"], 36, 21),
    ("D-1002", "Contoso POS refresh", 42000, "GBP", "Proposal", "u-rep-felix", "C-200",
     ["Hardware", "Support"], 24, 35),
    ("D-1003", "Fabrikam predictive maintenance pilot", 18500, "EUR", "Qualification", "u-rep-anna", "C-300",
     ["Software"], 12, 60),
    ("D-1004", "Tailspin fleet telematics", 96000, "USD", "Negotiation", "u-rep-felix", "C-400",
     ["Hardware", "Software", "Support"], 48, 14),
    ("D-1005", "Northwind support renewal", 12000, "EUR", "Closed Won", "u-rep-anna", "C-100",
     ["Support"], 12, -10),
    ("D-1006", "Contoso staff training programme", 7800, "GBP", "Prospecting", "u-rep-felix", "C-200",
     ["Training", "Services"], 6, 90),
]  # fmt: skip


def deals(today: date) -> list[dict[str, Any]]:
    """The seed deals, with close dates relative to `today` so they always look current."""
    return [
        {
            "id": deal_id,
            "name": name,
            "amount": amount,
            "currency": currency,
            "stage": stage,
            "owner_id": owner,
            "owner_manager_id": "u-mgr-boris",
            "company_id": company,
            "product_lines": lines,
            "term_months": term,
            "close_date": (today + timedelta(days=days)).isoformat(),
            "approval_status": "Approved" if stage == "Closed Won" else "Not submitted",
            "approval_expires_on": None,
            "approval_comment": None,
            "approval_progress": None,
        }
        for deal_id, name, amount, currency, stage, owner, company, lines, term, days in _DEALS
    ]


def seed(store: Store, today: date | None = None) -> None:
    """Fill an empty store (no webhooks are sent for seed data)."""
    today = today or store.clock().date()
    for user in USERS:
        store.insert("user", {**user, "active": True})
    for queue in QUEUES:
        store.insert("queue", queue)
    for company in COMPANIES:
        store.insert("company", company)
    for deal in deals(today):
        store.insert("deal", deal)
    for contract in CONTRACTS:
        store.insert("contract", contract)


def ensure_seeded(store: Store, *, reset: bool = False) -> bool:
    """Seed on first start, or afresh with `reset`; True when it seeded."""
    if reset:
        store.reset()
    if not store.is_empty():
        for user in USERS:  # a store seeded by an older version lacks e-mail, locale and manager
            store.fill_blanks("user", user["id"], {**user, "active": True})
        for queue in QUEUES:  # nor queues
            if store.get("queue", queue["id"]) is None:
                store.insert("queue", queue)
        return False
    seed(store)
    return True
