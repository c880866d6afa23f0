"""A drill's report: a row per run, as a terminal table, a JSON file and a picture.

The picture (matplotlib, the ``drill`` extra) has one panel per run: committed batches per second
over time, the reference's steady rate as a dashed line, and the moment the fault struck as a red line,
so that the dip and the recovery are seen at a glance. matplotlib is imported only to draw it.

Example:
    >>> r = DrillReport("m:P", "src", batches=10, stateful=False, deterministic=True)
    >>> r.rows.append(Row("kill", "actor SIGKILLed mid-call", "PASS", recovery_s=1.25, replayed=2, attempts=1))
    >>> r.rows.append(Row("preemption", "node preemption notice", "SKIPPED", skipped="needs more nodes"))
    >>> print(r.table())  # doctest: +NORMALIZE_WHITESPACE
    fault class               result   recovery  replayed  attempts  dip   extra   notes
    actor SIGKILLed mid-call  PASS         1.25s        2         1  -     -
    node preemption notice    SKIPPED  -         -         -         -     -       needs more nodes
    >>> r.ok, r.exit_code
    (True, 0)
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from resilient.drill.checks import commit_rates

__all__ = ["DrillReport", "Row"]

PICTURE, DATA = "drill.png", "drill.json"


@dataclass
class Row:
    """One run: its verdict (PASS, FAIL, SKIPPED, or REF for a reference), the checks that failed
    ("check: what broke"), and its figures (seconds; samples are ``(seconds since launch, batches)``)."""

    name: str
    title: str
    status: str
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    fault: str | None = None
    fault_at: float | None = None
    recovery_s: float | None = None
    replayed: int | None = None
    attempts: int | None = None
    restarts: int | None = None
    dip: float | None = None
    extra_s: float | None = None
    seconds: float | None = None
    incidents: list[str] = field(default_factory=list, repr=False)  # failures and recoveries, one line each
    samples: list[tuple[float, int]] = field(default_factory=list, repr=False)


@dataclass
class DrillReport:
    """Every run of a drill and what it found. ``ok`` is False when any check failed."""

    pipeline: str
    source: str
    batches: int
    stateful: bool
    deterministic: bool
    state_deterministic: bool = True
    hang_timeout: float | None = None
    reference_rate: float | None = None  # committed batches/s of the first reference, first commit to last
    seconds: float | None = None
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        """The lines above the table: what ran, and what was found about determinism."""
        kind = "stateful" if self.stateful else "stateless"
        det = "deterministic" if self.deterministic else "NOT deterministic (two fault-free runs differ): ids checked only"
        lines = [f"drill of {self.pipeline} ({kind}, {det}) on {self.batches} batches of {self.source}"]
        if self.hang_timeout is not None:
            lines.append(f"hang classes ran with a batch timeout of {self.hang_timeout:g}s")
        refs = [r for r in self.rows if r.name.startswith("reference")]
        if refs:
            lines.append("references: " + ", ".join(f"{r.seconds:.1f}s" for r in refs if r.seconds is not None)
                         + (f", {self.reference_rate:g} batches/s" if self.reference_rate else ""))
        disturbed = sum(r.restarts or 0 for r in refs)
        if disturbed:
            lines.append(f"WARNING: the fault-free references had {disturbed} actor restarts: something else kills "
                         "or starves this cluster's actors, and the figures below are disturbed by it")
        return "\n".join(lines)

    def table(self) -> str:
        """A row per fault class: verdict, recovery time, batches replayed, attempts charged, throughput
        dip, extra seconds against the reference, and the failed checks or the reason it was skipped."""
        head = ["fault class", "result", "recovery", "replayed", "attempts", "dip", "extra", "notes"]
        body = []
        for r in self.rows:
            if r.status == "REF":
                continue
            note = "; ".join(r.failed) or r.skipped or "; ".join(r.notes)
            body.append([
                r.title, r.status, _num(r.recovery_s, "{:.2f}s"), _num(r.replayed), _num(r.attempts),
                _num(r.dip, "{:.0%}"), _num(r.extra_s, "{:+.1f}s"), note,
            ])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        right = {2, 3, 4}
        lines = []
        for row in [head, *body]:
            cells = [str(c).rjust(w) if i in right and row is not head else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells[:-1]) + ("  " + cells[-1] if cells[-1].strip() else ""))
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}

    def write(self, directory: str) -> list[str]:
        """Write ``drill.json`` and ``drill.png`` into `directory` (created); return their paths. Without
        matplotlib (the ``drill`` extra) the picture is left out, with a warning that says so."""
        os.makedirs(directory, exist_ok=True)
        data = os.path.join(directory, DATA)
        with open(data, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        if importlib.util.find_spec("matplotlib") is None:
            warnings.warn("drill.png not written: matplotlib is not installed (pip install 'resilient[drill]')",
                          stacklevel=2)
            return [data]
        picture = os.path.join(directory, PICTURE)
        self.draw(picture)
        return [data, picture]

    def draw(self, path: str) -> None:
        """Committed batches per second over time, a panel per run, the fault marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        runs = [r for r in self.rows if r.samples]
        cols = 3
        rows = max(1, -(-len(runs) // cols))
        fig, axes = plt.subplots(rows, cols, figsize=(12, 2.3 * rows + 0.6), squeeze=False)
        views = [_view(r) for r in runs]
        top = max((v for _, _, rates in views for _, v in rates), default=1.0) * 1.1
        steady = self.reference_rate
        colors = {"PASS": "#2b7a2b", "FAIL": "#c0392b", "REF": "#555555"}
        for ax, r, (lo, hi, rates) in zip(axes.flat, runs, views):
            xs, ys = [t for t, _ in rates], [v for _, v in rates]
            ax.fill_between(xs, ys, step="post", color="#4a7ebb", alpha=0.35, linewidth=0)
            ax.step(xs, ys, where="post", color="#2c5d99", linewidth=1)
            if steady:
                ax.axhline(steady, color="#888888", linestyle="--", linewidth=0.8)
            if r.fault_at is not None:
                ax.axvline(r.fault_at, color="#d62728", linewidth=1.5)
                if r.recovery_s is not None:
                    ax.axvspan(r.fault_at, r.fault_at + r.recovery_s, color="#d62728", alpha=0.12, linewidth=0)
            label = r.status + (f", recovered in {r.recovery_s:.2f}s" if r.recovery_s is not None else "")
            ax.set_title(f"{r.title}\n{label}", fontsize=9, color=colors.get(r.status, "black"))
            ax.set_xlim(lo, hi)
            ax.set_ylim(0, top)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.25)
        for ax in axes.flat[len(runs):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("batches/s", fontsize=8)
        for ax in axes[-1, :]:
            ax.set_xlabel("seconds since launch", fontsize=8)
        fig.suptitle(f"resilient drill: {self.pipeline}, {self.batches} batches: committed batches/s\n"
                     "red line: the fault; shaded: recovery (until the struck slot commits again); dashed: the "
                     "reference's rate",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def _view(row: Row) -> tuple[float, float, list[tuple[float, float]]]:
    """A run's panel: from just before its first commit (or its fault) to just after its last, in bins
    of a fiftieth of that span (a quarter second at least: commits come in groups every 0.1 s)."""
    rising = [t for (_, a), (t, b) in zip(row.samples, row.samples[1:]) if b > a] or [0.0, 1.0]
    first = min([rising[0]] + ([row.fault_at] if row.fault_at is not None else []))
    span = max(0.5, rising[-1] - first)
    lo, hi = max(0.0, first - 0.08 * span), rising[-1] + 0.08 * span
    rates = [(t, v) for t, v in commit_rates(row.samples, min(1.0, max(0.25, span / 50))) if lo - 1 <= t <= hi]
    return lo, hi, rates


def _num(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)
