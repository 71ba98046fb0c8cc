"""Checks of a report's JSON fields (`kvmpy report merge` reads reports from anywhere): each
failure a ValueError naming the field by its path, e.g. ``runs[2].tests[0].outcome``."""
from __future__ import annotations


def describe(value: object) -> str:
    """A value as an error message shows it: its JSON kind and text."""
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def require(at: str, obj: dict, keys: tuple[str, ...]) -> None:
    """ValueError naming the first of ``keys`` missing from ``obj`` (the object at ``at``)."""
    for key in keys:
        if key not in obj:
            raise ValueError(f"{at}.{key}: missing")


def expect(where: str, value: object, kinds: tuple, what: str) -> None:
    """ValueError unless ``value`` (the field at ``where``) is one of ``kinds`` (a bool is no int)."""
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ValueError(f"{where}: {what} expected, not {describe(value)}"[:300])
