"""recrypt-outbox: a transactional outbox for the Recrypt gRPC API.

Writers call :func:`enqueue` (or a plain SQL ``INSERT``) inside their own transaction; the
daemon (``outbox run``) sends each row once, with its idempotency key.
"""

from __future__ import annotations

from outbox.errors import BadRowError, ConfigError, DuplicateKeyError, OutboxError
from outbox.writer import enqueue

__version__ = "0.1.0"
__all__ = [
    "BadRowError",
    "ConfigError",
    "DuplicateKeyError",
    "OutboxError",
    "__version__",
    "enqueue",
]
