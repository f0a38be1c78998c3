"""Tables of the user directory: one row per person per connection, one per connection refresh."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Date, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from connector.storage.db import Base, JSONType, UTCDateTime


class DirectoryPerson(Base):
    """A CRM user as last read from the CRM. People the CRM stops listing stay, inactive, so
    old requests keep showing their names."""

    __tablename__ = "directory_people"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(300))
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    email_lower: Mapped[str | None] = mapped_column(String(320), nullable=True)  # for find_by_email
    locale: Mapped[str | None] = mapped_column(String(32), nullable=True)
    manager_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    active: Mapped[bool] = mapped_column(default=True)
    refreshed_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_directory_email", "email_lower"),)


class DirectoryAlias(Base):
    """Another id the CRM uses for a person (HubSpot: the user id behind an owner id)."""

    __tablename__ = "directory_aliases"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))


class DirectoryRefresh(Base):
    """When a connection's directory was last read, and what happened."""

    __tablename__ = "directory_refreshes"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # last success
    people: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class DirectoryQueue(Base):
    """A CRM queue or group of approvers (Salesforce Queue/Group, HubSpot team, Zoho group,
    Bitrix24 department) and its members as last read, refreshed with the people."""

    __tablename__ = "directory_queues"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    queue_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(300))
    members: Mapped[list[str]] = mapped_column(JSONType, default=list)  # user ids
    refreshed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DelegationRow(Base):
    """A user away from `starts_on` to `ends_on` (inclusive, UTC dates): `deputy_id` acts for
    them, on every rule or on `rule_name` only. Cancelled rows stay, for the history."""

    __tablename__ = "delegations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(200))
    deputy_id: Mapped[str] = mapped_column(String(200))
    starts_on: Mapped[date] = mapped_column(Date)
    ends_on: Mapped[date] = mapped_column(Date)
    rule_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_delegations_user", "connection", "user_id", "ends_on"),)
