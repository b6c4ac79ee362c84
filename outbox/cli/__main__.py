"""``python -m outbox.cli``: the ``outbox`` command (``outbox.install`` writes it into units
when no console script is found)."""

from __future__ import annotations

from outbox.cli import main

main()
