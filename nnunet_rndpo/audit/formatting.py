"""Numbers as the audit's table and messages print them."""

from __future__ import annotations


def format_number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    # A difference that is 0 up to rounding error would print as "-0.000".
    if text.startswith("-") and float(text) == 0:
        return ("+" if "+" in spec else "") + text[1:]
    return text


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
