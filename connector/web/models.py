"""Tables of the web app: sign-in links waiting to be mailed, and links already used."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from connector.clock import utcnow
from connector.storage.db import Base, UTCDateTime


class SignInLinkRow(Base):
    """A sign-in link made for a user. Until mail delivery is wired in (docs/web.md), this row is
    where the link goes: `make run` shows it and the tests read it."""

    __tablename__ = "web_sign_in_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    link: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_web_sign_in_links_email", "email"),)


class UsedLinkRow(Base):
    """The nonce of every sign-in or decision link that was used: a link works once."""

    __tablename__ = "web_used_links"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))  # "sign_in" or "decision"
    user_id: Mapped[str] = mapped_column(String(200))
    used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
