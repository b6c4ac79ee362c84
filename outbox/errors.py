"""The error tree. Every message says what is wrong and what to do about it."""

from __future__ import annotations


class OutboxError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(OutboxError):
    """The configuration is wrong; the message names the key and the fix."""


class BadRowError(OutboxError):
    """A row (or an enqueue call) carries data that can never be sent as it is.

    ``reason`` is the short park reason stored with the row (see ``outbox.policy``).
    """

    def __init__(self, message: str, reason: str = "bad_row") -> None:
        super().__init__(message)
        self.reason = reason


class DuplicateKeyError(OutboxError):
    """An enqueue used an idempotency key that is already in the outbox."""


class RowNotFoundError(OutboxError):
    """No outbox row has that idempotency key."""


class OperatorActionError(OutboxError):
    """An operator action (requeue, cancel) is not allowed in the row's current state."""


class SchemaNotReadyError(OutboxError):
    """The database schema is missing or not at the head revision."""
