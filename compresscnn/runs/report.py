"""The run's report: ``report.json`` (the record), ``report.md`` (for people), plots.

``report.md`` is a pure function of ``report.json``: :func:`render_markdown` first normalises
its input exactly as ``report.json`` is written (paths and tuples to strings and lists,
non-finite floats to ``null``), sorts every mapping it walks, and formats numbers with fixed
rules, so rendering the in-memory dict and rendering the file read back give the same bytes.

Expected top-level keys (all optional; a missing or ``None`` section renders as "—" or is
left out): ``baseline``/``compressed``/``finetuned`` (each ``top1``, ``top5``, ``agreement``,
``disagreements_near_tie``, ``params``, ``macs``, ``loss``), ``onnx`` (``path``, ``bytes``, ``max_abs_diff``, ...),
``layers`` (rows with ``name, type, method, rank, params_before, params_after, macs_before,
macs_after, rel_error, skipped``), ``timings`` (stage → seconds), ``versions``, ``latency``,
``recipe``, ``finetune`` (stats from :func:`compresscnn.train.loop.finetune`),
``calibration`` (the data-aware fit: ``solver``, ``seconds``, ``forward_passes``,
``dense_refitted``; per layer in ``layers[].fit``), ``date``, ``machine``, ``warnings``
(lines shown first: what makes a number not mean what it seems).

Plots use matplotlib's object API (``matplotlib.figure.Figure`` renders through the Agg canvas
by itself), so no backend is switched and no pyplot state is touched, at import or ever.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch

from compresscnn import __version__
from compresscnn.runs.report_format import (_DASH, _cell, _fmt_bytes, _fmt_count, _fmt_float,
                                            _fmt_pct, _fmt_rank, _fmt_ratio, _kv_table,
                                            _latency_rows, _num, _ordered_stages, _runtime_lines,
                                            _table)
from compresscnn.runs.report_plots import _plot_latency, _plot_layers
from compresscnn.util.common import atomic_write_bytes, atomic_write_text

__all__ = [
    "write_report",
    "render_markdown",
    "to_json",
    "collect_versions",
    "collect_machine",
    "STAGES",
    "VERSION_PACKAGES",
]

log = logging.getLogger(__name__)

STAGES = ("baseline", "compressed", "finetuned", "trained")
VERSION_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "openvino",
                    "opencv-python-headless", "tensorly", "timm", "compresscnn")
# Pipeline order for the timings table; unknown stages follow, alphabetically.
LAYER_COLUMNS = (
    "name", "type", "method", "rank", "params_before", "params_after", "macs_before",
    "macs_after", "rel_error", "skipped",
)


# --------------------------------------------------------------------------- environment
def collect_versions() -> dict[str, str | None]:
    """Installed versions (from package metadata: nothing is imported, so no package's
    import-time side effects run); ``None`` for a package that is not installed."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out.get("compresscnn") is None:
        out["compresscnn"] = __version__
    try:
        out["numpy"] = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        out["numpy"] = None
    return out


def collect_machine() -> dict[str, Any]:
    """Platform, CPU count, torch's thread count and CUDA device (if any)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {
            "device": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "version": torch.version.cuda,
        }
    return info


# --------------------------------------------------------------------------- JSON
def _jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(v) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch scalars and arrays
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return _jsonable(obj.item())
    raise TypeError(f"report: cannot store a {type(obj).__name__} in report.json")


def to_json(report: Mapping[str, Any]) -> str:
    """The exact text of ``report.json``: indent 2, sorted keys, trailing newline."""
    return json.dumps(_jsonable(report), indent=2, sort_keys=True, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- markdown
def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` for ``report`` (the same for the dict and for ``report.json`` read back)."""
    r: dict[str, Any] = json.loads(to_json(report))
    lines: list[str] = []
    for section in _SECTIONS:
        lines += section(r)
    return "\n".join(lines).rstrip("\n") + "\n"


def _header_section(r: Mapping[str, Any]) -> list[str]:
    """Title, the warnings (what makes a number below not mean what it seems), run facts."""
    title = f"# compresscnn report: {r['name']}" if r.get("name") else "# compresscnn report"
    lines: list[str] = [title, ""]
    for w in r.get("warnings") or []:
        lines += [f"> **Warning:** {w}", ""]
    meta = []
    if r.get("date"):
        meta.append(f"- Date: {r['date']}")
    if r.get("recipe"):
        meta.append(f"- Recipe: `{r['recipe']}`")
    if r.get("model"):
        meta.append(f"- Model: `{r['model']}`")
    if r.get("input_size"):
        meta.append(f"- Input size: {_fmt_rank(r['input_size'])}")
    if meta:
        lines += meta + [""]
    return lines


def _summary_section(r: Mapping[str, Any]) -> list[str]:
    """Accuracy, agreement, size and cost of every stage, with ratios to the baseline."""
    base = r.get("baseline") or {}
    rows = []
    for stage in STAGES:
        st = r.get(stage)
        if (stage == "trained" and not st) or (stage == "finetuned" and r.get("trained")):
            continue  # a run either fine-tunes a compressed model or trains one from scratch
        if st is None:
            rows.append([stage] + [_DASH] * 8)
            continue
        rows.append([
            stage,
            _fmt_pct(st.get("top1")),
            _fmt_pct(st.get("top5")),
            _fmt_pct(st.get("agreement")),
            _fmt_count(st.get("params")),
            _fmt_count(st.get("macs")),
            _fmt_ratio(base.get("params"), st.get("params")),
            _fmt_ratio(base.get("macs"), st.get("macs")),
            _fmt_float(st.get("loss")),
        ])
    lines = ["## Summary", ""]
    lines += _table(
        ["Stage", "Top-1 %", "Top-5 %", "Agreement %", "Params", "MACs", "Params ratio", "MACs ratio", "Loss"],
        rows,
        ["l", "r", "r", "r", "r", "r", "r", "r", "r"],
    )
    ties = [f"{stage} {_fmt_pct(r[stage]['disagreements_near_tie'])}%" for stage in STAGES
            if (r.get(stage) or {}).get("disagreements_near_tie") is not None]
    return lines + [
        "",
        "Ratios are baseline ÷ stage (2.00× = half the parameters or MACs). Agreement is the "
        "share of images whose top-1 class equals the baseline model's."
        + (" Of the images where a stage disagrees with it, the share on which the baseline's "
           "two largest probabilities are within 0.05 of each other (decisions it makes by a "
           "hair, which small changes flip): " + ", ".join(ties) + "." if ties else ""),
        "",
    ]


def _onnx_section(r: Mapping[str, Any]) -> list[str]:
    onnx = r.get("onnx")
    if not onnx:
        return []
    lines = ["## ONNX", ""]
    lines += _table(
        ["File", "Size", "Max abs diff", "Opset", "Exporter"],
        [[
            f"`{onnx['path']}`" if onnx.get("path") else _DASH,
            _fmt_bytes(onnx.get("bytes")),
            _fmt_float(onnx.get("max_abs_diff"), 3),
            _cell(onnx.get("opset")),
            _cell(onnx.get("exporter")),
        ]],
        ["l", "r", "r", "r", "l"],
    )
    lines += _runtime_lines(onnx)
    if onnx.get("quantized"):
        q = onnx["quantized"]
        lines += ["", f"Dynamic int8 copy: `{q.get('path')}` ({_fmt_bytes(q.get('bytes'))})."]
    return lines + [""]


def _deploy_section(r: Mapping[str, Any]) -> list[str]:
    """The fp32 file beside its int8 copy (``export.quantize``): size, top-1, agreement with
    the original model, median latency in each runtime timed, and the int8 file's check
    against its fp32 source."""
    q, onnx = r.get("int8"), r.get("onnx")
    if not q or not onnx:
        return []
    fp32 = _final_stage(r)
    lat = {(row.get("model"), row.get("runtime"), row.get("batch")): row
           for row in (r.get("latency") or []) if isinstance(row, Mapping)}
    cols = sorted({(rt, b) for (_, rt, b) in lat if rt in ("onnxruntime", "openvino")},
                  key=lambda k: (k[1], k[0]))
    rows = []
    for label, model, f in (("baseline fp32", "baseline", None),
                            ("baseline int8", "baseline int8", None),
                            ("compressed fp32", "compressed", onnx),
                            ("compressed int8", "compressed int8", q)):
        st = (r.get("baseline") if model == "baseline" else fp32 if model == "compressed"
              else q if model == "compressed int8" else None) or {}
        if model == "baseline int8" and not any(k[0] == model for k in lat):
            continue
        rows.append([label, f"`{f['path']}`" if f and f.get("path") else _DASH,
                     _fmt_bytes(f.get("bytes")) if f else _DASH,
                     _fmt_pct(st.get("top1")), _fmt_pct(st.get("agreement"))]
                    + [_fmt_seconds((lat.get((model, rt, b)) or {}).get("median_ms"))
                       for rt, b in cols])
    par = q.get("parity") or {}
    lines = ["## int8", ""]
    lines += _table(["Model", "File", "Size", "Top-1 %", "Agreement %"]
                    + [f"{rt} ms (batch {b})" for rt, b in cols], rows,
                    ["l", "l", "r", "r", "r"] + ["r"] * len(cols))
    ratio = (_num(q.get("fp32_bytes")) or 0) / (_num(q.get("bytes")) or 1)
    lines += ["", f"`{q.get('path')}`: {q.get('mode')} int8"
              + (" (weights per channel)" if q.get("per_channel") else "")
              + f", {ratio:.2f}x smaller than the fp32 file. Against its fp32 source on "
              f"{par.get('images')} calibration images: ||int8 - fp32|| / ||fp32|| = "
              f"{_fmt_float(par.get('rel_error'), 3)} (bound {_cell(par.get('max_rel_error'))}), "
              f"top-1 agreement {_fmt_pct(par.get('agreement'))}%. Agreement in the table is "
              "with the original model's predictions; the baseline files are the original "
              "model exported and quantized the same way, for the latency columns (all models of "
              "one runtime and batch timed against each other, interleaved).", ""]
    return lines


def _final_stage(r: Mapping[str, Any]) -> Mapping[str, Any]:
    """The stage the exported file holds: trained, fine-tuned, else zero-shot."""
    for k in ("trained", "finetuned", "compressed"):
        if r.get(k):
            return r[k]
    return {}


def _latency_section(r: Mapping[str, Any]) -> list[str]:
    """Whole-model latency, then each replaced layer dense vs decomposed."""
    lines: list[str] = []
    lat_rows = _latency_rows(r.get("latency"))
    if lat_rows:
        lines += ["## Latency", ""]
        lines += _table(
            ["Model", "Runtime", "Threads", "Batch", "Median ms", "p10 ms", "p90 ms"],
            ([
                _cell(name), _cell(v.get("runtime")), _cell(v.get("threads")), _cell(v.get("batch")),
                _fmt_seconds(v.get("median_ms")), _fmt_seconds(v.get("p10_ms")), _fmt_seconds(v.get("p90_ms")),
            ] for name, v in lat_rows),
            ["l", "l", "r", "r", "r", "r", "r"],
        )
        lines += [""]
    layer_lat = r.get("layer_latency") or []
    if layer_lat:
        lines += ["### Per layer: dense vs decomposed", ""]
        lines += _table(
            ["Layer", "Runtime", "Threads", "Batch", "Dense ms", "Decomposed ms", "Speed-up"],
            ([
                f"`{row.get('layer')}`", _cell(row.get("runtime")), _cell(row.get("threads")),
                _cell(row.get("batch")), _fmt_seconds(row.get("dense_ms")),
                _fmt_seconds(row.get("decomposed_ms")),
                f"{row['speedup']:.2f}x" if _num(row.get("speedup")) is not None else _DASH,
            ] for row in layer_lat),
            ["l", "l", "r", "r", "r", "r", "r"],
        )
        lines += [""]
    return lines


def _layers_section(r: Mapping[str, Any]) -> list[str]:
    """One row per planned layer, and the totals."""
    layers = r.get("layers") or []
    if not layers:
        return []
    rows = []
    tot = {"params_before": 0.0, "params_after": 0.0, "macs_before": 0.0, "macs_after": 0.0}
    for row in layers:
        for k in tot:
            x = _num(row.get(k))
            if x is not None:
                tot[k] += x
        rows.append([
            f"`{row.get('name')}`",
            _cell(row.get("type")),
            _cell(row.get("method")),
            _cell(_fmt_rank(row.get("rank"))),
            _fmt_count(row.get("params_before")),
            _fmt_count(row.get("params_after")),
            _fmt_count(row.get("macs_before")),
            _fmt_count(row.get("macs_after")),
            _fmt_float(row.get("rel_error"), 3),
            _cell(row.get("skipped")),
        ])
    rows.append([
        "**total**", "", "", "",
        _fmt_count(tot["params_before"]), _fmt_count(tot["params_after"]),
        _fmt_count(tot["macs_before"]), _fmt_count(tot["macs_after"]), "", "",
    ])
    lines = ["## Layers", ""]
    lines += _table(
        ["Layer", "Type", "Method", "Rank", "Params before", "Params after", "MACs before",
         "MACs after", "Rel. error", "Skipped"],
        rows,
        ["l", "l", "l", "l", "r", "r", "r", "r", "r", "l"],
    )
    return lines + [""]


def _calibration_section(r: Mapping[str, Any]) -> list[str]:
    return _fit_section(r.get("calibration"), r.get("layers") or [])


def _training_section(r: Mapping[str, Any]) -> list[str]:
    ft = r.get("finetune")
    if not ft:
        return []
    title = "## Training" if r.get("trained") else "## Fine-tuning"
    lines = [title, ""] + _kv_table({k: v for k, v in ft.items() if k != "curve"},
                                    "Statistic") + [""]
    if ft.get("curve"):  # train/finetune.curve: top-1 on the evaluation source per epoch
        lines += ["Learning curve: top-1 on the evaluation images after each epoch.", ""]
        lines += _table(["Epoch", "Top-1"], ([_cell(p["epoch"]), f"{p['top1']:.2f}"]
                                             for p in ft["curve"]), ["r", "r"]) + [""]
    return lines


def _timings_section(r: Mapping[str, Any]) -> list[str]:
    timings = r.get("timings") or {}
    if not timings:
        return []
    lines = ["## Stage timings", ""]
    lines += _table(
        ["Stage", "Seconds"],
        ([_cell(k), _fmt_seconds(timings[k])] for k in _ordered_stages(timings)),
        ["l", "r"],
    )
    return lines + [""]


def _environment_section(r: Mapping[str, Any]) -> list[str]:
    """Package versions and the machine."""
    lines: list[str] = []
    if r.get("versions"):
        lines += ["## Versions", ""] + _kv_table(r["versions"], "Package", "Version") + [""]
    if r.get("machine"):
        lines += ["## Machine", ""] + _kv_table(r["machine"]) + [""]
    return lines


def _fit_section(cal: Any, layers: list[Mapping[str, Any]]) -> list[str]:
    """"Data-aware fit": solver, wall time and forward passes, then per fitted layer its
    relative output error data-free and after the fit, and the fit's seconds."""
    if not cal:
        return []
    lines = ["## Data-aware fit", ""]
    if cal.get("solver"):
        lines += [f"Solver `{cal.get('solver')}`: {_fmt_seconds(cal.get('seconds'))} s in all, "
                  f"{_cell(cal.get('forward_passes'))} forward passes of a whole model over "
                  f"the calibration batches ({_cell(cal.get('walk'))}).", ""]
    kd = cal.get("distill")
    if kd:
        lines += [f"Then distilled end to end on the same batches: {_cell(kd.get('epochs'))} "
                  f"passes ({_cell(kd.get('steps'))} Adam steps at lr {_cell(kd.get('lr'))}, "
                  f"T={_cell(kd.get('temperature'))}, {_cell(kd.get('amp'))}"
                  + (f", inputs mixed by {kd['mix']}" if kd.get("mix") not in (None, "none")
                     else "") + ") in "
                  f"{_fmt_seconds(kd.get('seconds'))} s; loss {_fmt_float(kd.get('loss_before'))}"
                  f" -> {_fmt_float(kd.get('loss_after'))}, agreement with the original on "
                  f"those batches {_fmt_float(kd.get('agreement_before'))}% -> "
                  f"{_fmt_float(kd.get('agreement_after'))}%.", ""]
    rows = [(row.get("name"), row.get("fit") or {}) for row in layers]
    rows += sorted((cal.get("dense_refitted") or {}).items())
    rows = [(n, f) for n, f in rows if f.get("output_error") is not None]
    lines += _table(
        ["Layer", "Error data-free", "Error fitted", "Seconds", "Solver", "Iterations"],
        ([f"`{n}`", _fmt_float(f.get("output_error_data_free")),
          _fmt_float(f.get("output_error")), _fmt_seconds(f.get("fit_seconds")),
          _cell(f.get("fit_solver")), _cell(f.get("fit_iters"))] for n, f in rows),
        ["l", "r", "r", "r", "l", "r"],
    )
    return lines + [""]



#: the sections of ``report.md``, in order
_SECTIONS = (_header_section, _summary_section, _onnx_section, _deploy_section,
             _latency_section,
             _layers_section, _calibration_section, _training_section, _timings_section,
             _environment_section)

def _fmt_seconds(v: Any) -> str:
    x = _num(v)
    return _DASH if x is None else f"{x:.2f}"


# --------------------------------------------------------------------------- entry point
def write_report(run_dir: str | os.PathLike, report: Mapping[str, Any], *, plots: bool = True) -> None:
    """Write ``report.json``, ``report.md`` and (with ``plots``) ``layers.png`` and, when the
    report has latency numbers, ``latency.png`` into ``run_dir``, each atomically.

    ``date``, ``versions`` and ``machine`` are filled in when absent. A plot that fails is
    logged and skipped: it must not cost the run its report.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    full = dict(report)
    full.setdefault("date", _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())
    full.setdefault("versions", collect_versions())
    full.setdefault("machine", collect_machine())
    text = to_json(full)
    normalised = json.loads(text)
    atomic_write_text(run_dir / "report.json", text)
    atomic_write_text(run_dir / "report.md", render_markdown(normalised))
    if not plots:
        return
    for name, make in (
        ("layers.png", lambda: _plot_layers(normalised.get("layers") or [])),
        ("latency.png", lambda: _plot_latency(_latency_rows(normalised.get("latency")))),
    ):
        try:
            png = make()
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("report: could not draw %s (%s: %s)", name, type(exc).__name__, exc)
            continue
        if png is not None:
            atomic_write_bytes(run_dir / name, png)
