"""Formatting and statistics shared by the benchmarks."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class Report:
    """Lines a benchmark prints, plus the headline numbers for the summary."""

    title: str
    lines: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)

    def add(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def key(self, line: str) -> None:
        """Print a line and keep it for the closing summary."""
        self.headline.append(line)
        self.add(line)


def merge_histograms(histograms: Iterable[Mapping[str, int]]) -> Counter[int]:
    merged: Counter[int] = Counter()
    for histogram in histograms:
        for bucket, count in histogram.items():
            merged[int(bucket)] += count
    return merged


def histogram_percentiles(
    histogram: Mapping[int, int], bucket_us: int, quantiles: Sequence[float]
) -> list[float]:
    """Return the given quantiles (0..1) of a bucketed histogram, in milliseconds.

    Each value is the upper edge of its bucket, so it errs high by at most
    one bucket.
    """
    total = sum(histogram.values())
    if not total:
        return [float("nan")] * len(quantiles)
    results: list[float] = []
    ordered = sorted(histogram.items())
    for quantile in quantiles:
        wanted = quantile * total
        running = 0
        for bucket, count in ordered:
            running += count
            if running >= wanted:
                results.append((bucket + 1) * bucket_us / 1000)
                break
    return results


def histogram_count(histogram: Mapping[int, int]) -> int:
    return sum(histogram.values())


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rate_text(value: float) -> str:
    return f"{value:,.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Format a Markdown table, so that output can be pasted into docs."""
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(" --- " for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines
