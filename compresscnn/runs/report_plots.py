"""The run report's plots: per-layer rank and error (``layers.png``) and latency per runtime
(``latency.png``), drawn with matplotlib only when asked."""

from __future__ import annotations

import io
import logging
from typing import Any, Mapping

from compresscnn.runs.report_format import _num

log = logging.getLogger(__name__)


def _plot_layers(layers: list[Mapping[str, Any]]) -> bytes | None:
    rows = [l for l in layers if _num(l.get("params_before")) is not None]
    if not rows:
        return None
    from matplotlib.figure import Figure  # heavy: imported only when a plot is drawn

    names = [str(l.get("name")) for l in rows]
    n = len(rows)
    fig = Figure(figsize=(11, max(3.0, 0.28 * n + 1.6)), dpi=100)
    axes = fig.subplots(1, 2, sharey=True)
    ys = list(range(n))
    h = 0.4
    for ax, key, title in ((axes[0], "params", "Parameters"), (axes[1], "macs", "MACs")):
        before = [_num(l.get(f"{key}_before")) or 0.0 for l in rows]
        after = [_num(l.get(f"{key}_after")) if _num(l.get(f"{key}_after")) is not None else b
                 for l, b in zip(rows, before)]
        ax.barh([y - h / 2 for y in ys], before, height=h, label="before", color="#9aa5b1")
        ax.barh([y + h / 2 for y in ys], after, height=h, label="after", color="#2b6cb0")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        positive = [v for v in before + after if v and v > 0]
        if positive:  # costs span orders of magnitude across a network: log axis
            ax.set_xscale("log", nonpositive="clip")
            ax.set_xlim(left=min(positive) / 2, right=max(positive) * 1.5)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(names, fontsize=7)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncols=2)
    fig.suptitle("Per-layer cost before and after compression")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_RUNTIME_COLORS = {"torch": "#2b6cb0", "onnxruntime": "#dd6b20", "openvino": "#38a169"}


def _plot_latency(rows: list[tuple[str, Mapping[str, Any]]]) -> bytes | None:
    """One bar per model, runtime and batch, named by all three; one colour per runtime
    (the legend), the threads in the title."""
    rows = [(n, v) for n, v in rows if _num(v.get("median_ms")) is not None]
    if not rows:
        return None
    from matplotlib.figure import Figure  # heavy: imported only when a plot is drawn
    from matplotlib.patches import Patch

    fig = Figure(figsize=(7.5, max(2.5, 0.4 * len(rows) + 1.6)), dpi=100)
    ax = fig.subplots()
    med = [float(v["median_ms"]) for _, v in rows]
    lo = [max(0.0, m - (_num(v.get("p10_ms")) or m)) for m, (_, v) in zip(med, rows)]
    hi = [max(0.0, (_num(v.get("p90_ms")) or m) - m) for m, (_, v) in zip(med, rows)]
    ys = list(range(len(rows)))
    rts = [str(v.get("runtime") or "?") for _, v in rows]
    ax.barh(ys, med, xerr=[lo, hi], color=[_RUNTIME_COLORS.get(rt, "#718096") for rt in rts],
            capsize=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{n} · {rt}" + (f" · batch {v['batch']}" if v.get("batch") is not None
                                          else "") for (n, v), rt in zip(rows, rts)],
                       fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median latency, ms (bars: p10–p90)")
    ax.grid(axis="x", alpha=0.3)
    seen = list(dict.fromkeys(rts))
    ax.legend(handles=[Patch(color=_RUNTIME_COLORS.get(rt, "#718096"), label=rt) for rt in seen],
              title="runtime", fontsize=8, loc="lower right")
    threads = sorted({str(v.get("threads")) for _, v in rows if v.get("threads") is not None})
    ax.set_title("Latency by runtime: " + ", ".join(seen)
                 + (f" ({'/'.join(threads)} thread(s))" if threads else ""), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


