"""Text for people: the one number formatter and markdown-table helpers (console tables, report
pages, model cards and sweep results all format numbers through `fmt`)."""

from __future__ import annotations

from collections.abc import Iterable

MISSING = "—"


def fmt(value: float | None, digits: int | str = 3, missing: str = MISSING,
        signed: bool = False) -> str:  # fmt: skip
    """`value` with `digits` decimals (or a format spec such as ".2f" or ",d"); `missing` for
    None; `signed` puts a + before positive values."""
    if value is None:
        return missing
    spec = digits if isinstance(digits, str) else f".{digits}f"
    return format(value, ("+" if signed else "") + spec)


def md_row(cells: Iterable[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def md_table(header: Iterable[object], rows: Iterable[Iterable[object]]) -> list[str]:
    """A markdown table's lines: header, separator, rows."""
    header = list(header)
    return [md_row(header), "|" + "---|" * len(header), *(md_row(row) for row in rows)]
