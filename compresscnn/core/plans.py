"""What :func:`~compresscnn.core.planning.plan` decides and the later steps of
:func:`~compresscnn.core.surgery.compress` measure: :class:`Plan` and its rows,
:class:`Replacement`. Both are frozen dataclasses: each step returns a new plan
(:func:`dataclasses.replace`), none edits one. A plan prints itself (:meth:`Plan.summary`,
what ``--dry-run`` shows) and gives the report's layer table (:meth:`Plan.to_rows`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from compresscnn.core.ranks import Skip

__all__ = ["Plan", "Replacement"]


@dataclass(frozen=True)
class Replacement:
    """One row of a plan: a layer and what happens to it. Rows are not edited: a step that
    measures or changes something (apply, the data-aware fit, the latency check) makes a new
    row with :func:`dataclasses.replace`."""

    name: str
    type: str
    shape: str
    method: str
    rank: list[int] | None
    options: dict[str, Any]
    policy: str
    params_before: int
    macs_before: int
    params_after: int
    macs_after: int
    rel_error: float | None = None     # estimated from spectra in plan, measured by apply
    skipped: str | None = None          # the reason a layer matched but is left dense
    skip: Skip | None = None            # the same reason as a kind (not in the report rows)
    rule: int = 0
    fit: dict[str, Any] = field(default_factory=dict)
    latency_before: float | None = None  # measured ms of the dense layer (objective latency)
    latency_after: float | None = None   # measured ms of the chosen decomposition
    calls: int = 1                       # calls in one forward pass (MACs count each)
    aliases: tuple[str, ...] = ()        # the other names of the same (shared) module

    @property
    def applied(self) -> bool:
        return self.skipped is None and self.rank is not None


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` decided, and what the later steps of :func:`compress` measured;
    each of those steps returns a new plan (``dataclasses.replace``), none edits one."""

    replacements: tuple[Replacement, ...]
    input_size: tuple[int, ...]
    total_params: int
    total_macs: int
    target: dict[str, float] | None = None
    #: runtime, threads, batch and measured whole-model ms when latency-aware planning ran
    latency: dict[str, Any] | None = None
    latency_config: Any = field(default=None, repr=False, compare=False)
    #: what :func:`compress` measured after apply: BatchNorm layers re-estimated, and the
    #: whole-model not-slower check of latency-aware planning
    bn_recalibrated: int = 0
    latency_check: dict[str, Any] | None = None
    #: solver, wall time, forward passes and the dense layers refitted, after a data-aware fit
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "replacements", tuple(self.replacements))

    @property
    def params_after(self) -> int:
        return self.total_params + sum(r.params_after - r.params_before
                                       for r in self.replacements if r.applied)

    @property
    def macs_after(self) -> int:
        return self.total_macs + sum(r.macs_after - r.macs_before
                                     for r in self.replacements if r.applied)

    def ranks(self) -> dict[str, list[int]]:
        """The exact per-layer ranks (what the resolved recipe stores)."""
        return {r.name: list(r.rank) for r in self.replacements if r.applied}

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows of the report's layer table (``skip`` is said by ``skipped``)."""
        rows = [asdict(r) for r in self.replacements]
        for row in rows:
            del row["skip"]
        return rows

    def summary(self) -> str:
        """A table a person reads (what ``--dry-run`` prints)."""
        timed = any(r.latency_before is not None for r in self.replacements)
        head = ["layer", "shape", "method", "rank", "policy", "params", "MACs", "est. err"]
        head += ["ms"] if timed else []
        rows = []
        for r in self.replacements:
            name = r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else "") + (
                f" x{r.calls}" if r.calls > 1 else "")
            if r.applied:
                rank = "x".join(str(x) for x in r.rank)
                p = f"{r.params_before:,} -> {r.params_after:,}"
                m = f"{r.macs_before:,} -> {r.macs_after:,}"
                e = f"{r.rel_error:.3f}" if r.rel_error is not None else "-"
                row = [name, r.shape, r.method, rank, r.policy, p, m, e]
                ms = (f"{r.latency_before:.3g} -> {r.latency_after:.3g}"
                      if r.latency_before is not None and r.latency_after is not None else "-")
            else:
                row = [name, r.shape, r.method, "-", f"skipped: {r.skipped}",
                       f"{r.params_before:,}", f"{r.macs_before:,}", "-"]
                ms = f"{r.latency_before:.3g}" if r.latency_before is not None else "-"
            rows.append(row + ([ms] if timed else []))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        pa, ma = self.params_after, self.macs_after
        out.append("")
        out.append(f"model params {self.total_params:,} -> {pa:,} "
                   f"({self.total_params / max(pa, 1):.2f}x fewer); "
                   f"MACs {self.total_macs:,} -> {ma:,} ({self.total_macs / max(ma, 1):.2f}x fewer)")
        lat = self.latency or {}
        if lat:
            line_ = (f"latency ({lat.get('runtime')}, {lat.get('threads')} thread(s), batch "
                     f"{lat.get('batch')}): {lat['layers_timed']} layers timed alone, "
                     f"{lat['layers_dense_ms']:.3g} ms dense -> {lat['layers_planned_ms']:.3g}"
                     f" ms planned")
            if lat.get("compressed_ms") is not None:
                line_ += (f"; measured {lat['original_ms']:.3g} -> {lat['compressed_ms']:.3g} ms"
                          f" ({lat['original_ms'] / lat['compressed_ms']:.2f}x)")
            out.append(line_)
        if self.target:
            (k, v), = self.target.items()
            if k == "latency":
                got = lat["layers_planned_ms"] / max(lat["layers_dense_ms"], 1e-12)
            else:
                got = (pa / self.total_params) if k == "params" else (ma / self.total_macs)
            out.append(f"target: keep {v:g} of {k}; planned {got:.3f}")
        return "\n".join(out)
