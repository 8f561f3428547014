"""Cells and tables of the run report's Markdown: numbers, sizes, ratios, ranks, latency rows."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from compresscnn.util.common import fmt_quantity

_STAGE_ORDER = (
    "load_model", "plan", "load_data", "evaluate_baseline", "compress", "apply", "calibrate",
    "latency_check", "evaluate_compressed", "finetune", "evaluate_finetuned", "train",
    "evaluate_trained", "export_onnx", "quantize", "evaluate_int8",
    "latency", "report", "total",
)
_DASH = "—"


def _cell(v: Any) -> str:
    s = _DASH if v is None or v == "" else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _fmt_count(v: Any) -> str:
    """1234 → ``1.23 k``; 25_557_032 → ``25.56 M``; 4.1e9 → ``4.10 G``."""
    return fmt_quantity(v, missing=_DASH)


def _fmt_bytes(v: Any) -> str:
    return fmt_quantity(v, "B", missing=_DASH)


def _fmt_pct(v: Any) -> str:
    x = _num(v)
    return _DASH if x is None else f"{x:.2f}"


def _fmt_float(v: Any, digits: int = 4) -> str:
    x = _num(v)
    if x is None:
        return _cell(v) if isinstance(v, str) else _DASH
    if x == int(x) and abs(x) < 1e15 and isinstance(v, int):
        return str(int(x))
    return f"{x:.{digits}g}"


def _runtime_lines(onnx: dict[str, Any]) -> list[str]:
    """One line per export check: each runtime's agreement with PyTorch, what was folded."""
    out = []
    checked = onnx.get("verify") or {}
    if checked:
        out += ["", "Runtimes, max abs diff against PyTorch (relative L2 error): " + ", ".join(
            f"{rt} {_fmt_float(v.get('max_abs_diff'), 2)} ({_fmt_float(v.get('rel_l2'), 2)})"
            for rt, v in checked.items()) + "."]
    folded = onnx.get("folded") or {}
    if any(folded.values()):
        out += ["", f"Folded before export: {folded.get('batchnorms', 0)} BatchNorm(s) into "
                    f"the convs before them, {folded.get('gathers', 0)} Fire channel "
                    f"reorder(s) into the convs after them."]
    return out


def _fmt_ratio(base: Any, value: Any) -> str:
    b, x = _num(base), _num(value)
    if b is None or x is None or x == 0:
        return _DASH
    return f"{b / x:.2f}×"


def _fmt_rank(r: Any) -> str:
    if r is None:
        return _DASH
    if isinstance(r, list):
        return "(" + ", ".join(str(v) for v in r) + ")" if len(r) != 1 else str(r[0])
    return str(r)


def _fmt_any(v: Any) -> str:
    if isinstance(v, float):
        return _fmt_float(v)
    if isinstance(v, (dict, list)):
        return _cell(json.dumps(v, sort_keys=True))
    return _cell(v)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], align: Iterable[str] | None = None) -> list[str]:
    header = list(header)
    align = list(align) if align is not None else ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _kv_table(d: Mapping[str, Any], key_name: str = "Key", value_name: str = "Value") -> list[str]:
    return _table([key_name, value_name], ([_cell(k), _fmt_any(d[k])] for k in sorted(d)))


def _latency_rows(lat: Any, prefix: str = "") -> list[tuple[str, Mapping[str, Any]]]:
    """Every mapping holding a ``median_ms``, with its location as the row name. ``latency``
    may be one such mapping, a nested mapping of them, or a list of rows (named by their
    ``model``/``name`` key)."""
    if isinstance(lat, list):
        rows = []
        for i, item in enumerate(lat):
            if isinstance(item, Mapping):
                name = item.get("model", item.get("name"))
                name = str(name) if name is not None else f"#{i + 1}"
                rows += _latency_rows(item, f"{prefix}/{name}" if prefix else name)
        return rows
    if not isinstance(lat, Mapping):
        return []
    if "median_ms" in lat:
        return [(prefix or "model", lat)]
    rows = []
    for k in sorted(lat):
        rows += _latency_rows(lat[k], f"{prefix}/{k}" if prefix else str(k))
    return rows


def _ordered_stages(timings: Mapping[str, Any]) -> list[str]:
    known = [s for s in _STAGE_ORDER if s in timings]
    return known + sorted(k for k in timings if k not in _STAGE_ORDER)


