"""Registries filled at class definition (`class X(Base, name="x")`): one rule for all of them."""

from __future__ import annotations

from typing import Any


def register(table: dict[str, Any], key: str, cls: type, what: str) -> None:
    """table[key] = cls; a second class for the same key is refused, naming both."""
    if key in table:
        raise TypeError(f"{what} '{key}' is registered twice ({table[key].__name__} and {cls.__name__})")
    table[key] = cls
