"""Where the shipped migrations and protos live: inside the wheel, or in the checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(packaged: str, checkout: str) -> Path:
    inside = _PACKAGE / packaged
    if inside.is_dir():
        return inside
    beside = _PACKAGE.parent / checkout
    if beside.is_dir():
        return beside
    raise FileNotFoundError(f"neither {inside} nor {beside} exists: the installation is broken")


def migrations_dir() -> Path:
    return _find("_migrations", "migrations")


def protos_dir() -> Path:
    return _find("_protos", "protos")
