"""Rejections: every bad delivery gets a 4xx saying what was wrong, where, and how to fix it."""

from __future__ import annotations


class WebhookError(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return {"error": body}


def bad_request(code: str, message: str, hint: str | None = None) -> WebhookError:
    return WebhookError(400, code, message, hint)


def unauthorized(code: str, message: str, hint: str | None = None) -> WebhookError:
    return WebhookError(401, code, message, hint)
