"""Errors the server turns into HTTP answers."""

from __future__ import annotations


class BadRequest(ValueError):
    """A request the server refuses; the message says what was wrong."""

    def __init__(self, message: str, status: int = 400, details: list[dict] | None = None, allow: str = ""):
        super().__init__(message)
        self.status = status
        self.details = details or []
        self.allow = allow  # for a 405: the methods the route takes (the Allow header)


class Unavailable(RuntimeError):
    """A dependency (model, online store) cannot answer right now: 503, retry later."""
