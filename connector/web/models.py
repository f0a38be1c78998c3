"""Tables of the web app: the links already used (sign-in links are mailed through the
notification outbox, connector/notify/)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from connector.clock import utcnow
from connector.storage.db import Base, UTCDateTime


class UsedLinkRow(Base):
    """The nonce of every sign-in or decision link that was used: a link works once."""

    __tablename__ = "web_used_links"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))  # "sign_in" or "decision"
    user_id: Mapped[str] = mapped_column(String(200))
    used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
