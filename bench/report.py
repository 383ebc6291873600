"""The figures a benchmark reports: a value, the machine's own limit it is judged against,
a target (a ratio to the limit, or the value itself when there is no limit), and the
table and JSON every bench script prints and writes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    limit: float | None = None
    limit_name: str = ""
    target: float | None = None       # a ratio to the limit, or the value itself if no limit
    at_most: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.limit if self.limit else None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        measured = self.ratio if self.limit is not None else self.value
        if measured is None:
            return "MISS"
        met = measured <= self.target if self.at_most else measured >= self.target
        return "PASS" if met else "MISS"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(value=round(self.value, 2), verdict=self.verdict,
                    ratio=None if self.ratio is None else round(self.ratio, 3))
        if self.limit is not None:
            data["limit"] = round(self.limit, 2)
        return data


def _number(value: float, unit: str) -> str:
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"


def format_table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "limit", "ratio", "target", "result")]
    for f in figures:
        limit = _number(f.limit, f.limit_name) if f.limit is not None else "-"
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
        if f.target is None:
            target = "-"
        else:
            target = f"{'<=' if f.at_most else '>='} {f.target:g}"
            if f.limit is None:
                target += f" {f.unit}"
        rows.append((f.name, _number(f.value, f.unit), limit, ratio, target, f.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
