"""Payloads and responses as the console shows them: pretty JSON, named fields hidden.

``[console] redact_fields`` names fields (``from_account`` also matches ``fromAccount``) whose
values are shown as ``•••`` at any depth. A stored text that is not JSON is shown as it is.
Imports nothing of the outbox.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

MASK = "•••"


def _norm(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _hide(value: Any, hidden: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {
            key: MASK if _norm(str(key)) in hidden else _hide(item, hidden)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_hide(item, hidden) for item in value]
    return value


def pretty(stored: Any, redact: Iterable[str]) -> str:
    """The stored JSON text (or value) indented, with the ``redact`` fields masked."""
    if stored is None:
        return ""
    value = stored
    if isinstance(stored, str):
        try:
            value = json.loads(stored)
        except ValueError:
            return stored
    hidden = frozenset(_norm(name) for name in redact)
    return json.dumps(_hide(value, hidden), indent=2, ensure_ascii=False, sort_keys=True)
