"""The outputs of ``compresscnn compare``: the Markdown table, the size/accuracy plot and the
JSON rows, written atomically into the output folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from compresscnn.util.common import atomic_path, atomic_write_text, fmt_quantity

__all__ = ["render_markdown", "plot_compare", "write_compare", "compare_outputs"]


def _fmt_ms(v: Any) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _batches(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    bs = {int(k.rsplit("_b", 1)[1]) for r in rows for k in (r.get("latency_ms") or {})}
    return sorted(bs)


_RUNTIME_NAMES = {"torch": "PyTorch", "ort": "ORT", "ort_int8": "ORT int8", "ov": "OpenVINO",
                  "ov_int8": "OpenVINO int8"}


def _ratio_cell(r: Mapping[str, Any], first: Mapping[str, Any]) -> str:
    if r is first:
        return "1x"
    if not first["params"] or not r["params"]:
        return "-"
    ratio = first["params"] / r["params"]
    return f"{ratio:.1f}x fewer" if ratio >= 1 else f"{1 / ratio:.1f}x more"


def _row_cells(r: Mapping[str, Any], lat_keys: list[str], int8_acc: bool,
               first: Mapping[str, Any]) -> list[str]:
    lat = r.get("latency_ms") or {}
    top1, n = r.get("top1"), r.get("top1_images")
    cells = [str(r["model"]).replace("|", "/"), fmt_quantity(r["params"]),
             fmt_quantity(r["macs"]), fmt_quantity(r.get("onnx_bytes"), "B"),
             fmt_quantity(r.get("onnx_int8_bytes"), "B")]
    cells += [_fmt_ms(lat.get(k)) for k in lat_keys]
    cells += ["-" if top1 is None else f"{top1:.2f}",
              _SOURCE_LABELS.get(r.get("top1_source"), r.get("top1_source") or "-"),
              "-" if n is None else f"{int(n):,}"]
    if int8_acc:
        cells.append("-" if r.get("int8_top1") is None else f"{r['int8_top1']:.2f}")
    return cells + [_ratio_cell(r, first)]


def _table_lines(rows: Sequence[Mapping[str, Any]], bs: list[int]) -> list[str]:
    runtimes = [k for k in _RUNTIME_NAMES
                if any(f"{k}_b{b}" in (r.get("latency_ms") or {}) for r in rows for b in bs)]
    int8_acc = any(r.get("int8_top1") is not None for r in rows)
    head = ["Model", "Params", "MACs", "ONNX fp32", "ONNX int8"]
    head += [f"{_RUNTIME_NAMES[k]} b{b} (ms)" for b in bs for k in runtimes]
    head += ["Top-1 %", "Top-1 source", "Images"] + (["int8 top-1 %"] if int8_acc else [])
    head += ["Params vs first"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if h in ("Model", "Top-1 source") else "---:" for h in head)
             + "|"]
    lat_keys = [f"{k}_b{b}" for b in bs for k in runtimes]
    for r in rows:
        lines.append("| " + " | ".join(_row_cells(r, lat_keys, int8_acc, rows[0])) + " |")
    return lines


_SOURCE_NOTE = (
    "- Top-1 source: `measured here` = evaluated by this command on the data named below (the "
    "same loader and evaluation as `compresscnn run`); `run report` = the run directory's "
    "report.json, on the images that run evaluated; `published` = the published metadata of "
    "the weights (torchvision's `Weights.meta` for torchvision models, on the 50,000 "
    "ImageNet-1k validation images), not measured here; `-` = no accuracy (untrained). "
    "Images: how many images the top-1 is measured on. Numbers from different sources or "
    "image sets are not measurements of one thing.")


def _note_lines(rows: Sequence[Mapping[str, Any]], bs: list[int]) -> list[str]:
    lines = ["- MACs: one forward pass of one input (multiply-adds, torchvision's `_ops` "
             "convention). Input sizes: " + ", ".join(
                 sorted({"x".join(map(str, r["input_size"])) for r in rows})) + "."]
    for how in sorted({str(r["int8_method"]) for r in rows if r.get("int8_method")}):
        who = ", ".join(r["model"] for r in rows if r.get("int8_method") == how)
        lines.append(f"- int8 ({who}): {how}." + (
            " int8 top-1: the run's report, on the images it evaluated."
            if "export.quantize" in how else ""))
    if bs:
        thr = sorted({r.get("threads") for r in rows})
        reps = sorted({x.get("repeats") for r in rows for x in r.get("latency") or []})
        lines.append(f"- Latency: median of {', '.join(map(str, reps))} runs, CPU, "
                     f"{', '.join(map(str, thr))} thread(s) (torch.set_num_threads / onnxruntime "
                     "intra_op_num_threads), random input; bN = batch N.")
    lines.append(_SOURCE_NOTE)
    for r in rows:
        acc = r.get("accuracy") or {}
        if acc:
            bits = [f"{k} {v}" for k, v in acc.items() if k != "source" and v is not None]
            lines.append(f"- {r['model']}: top-1 {acc.get('source')} ({'; '.join(bits)}).")
        lines += [f"- {r['model']}: {n}" for n in r.get("notes") or []]
    return lines


def render_markdown(rows: Sequence[Mapping[str, Any]], *, title: str = "Model comparison") -> str:
    """The comparison as Markdown: one table row per model, then notes on how each column
    was measured and where each accuracy comes from."""
    bs = _batches(rows)
    body = _table_lines(rows, bs) if rows else []
    return "\n".join([f"# {title}", "", *body, "", "Notes:", "", *_note_lines(rows, bs)]) + "\n"


_SOURCE_LABELS = {"measured": "measured here", "run report": "run report",
                  "published": "published"}


def _size_mb(r: Mapping[str, Any]) -> tuple[float, bool]:
    """(size in MB, from the ONNX file?) of a row: the fp32 ONNX file, else 4 bytes/param."""
    if r.get("onnx_bytes"):
        return float(r["onnx_bytes"]) / 1e6, True
    return 4.0 * float(r["params"]) / 1e6, False


def plot_compare(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                 title: str = "Accuracy vs model size") -> Path:
    """Top-1 against model size and against MACs (two panels, log x), one labelled point per
    model with an accuracy; filled circles measured here, squares from run reports, open
    triangles published."""
    import matplotlib  # heavy: imported only when a plot is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    fig, (ax_size, ax_macs) = plt.subplots(1, 2, figsize=(12, 5), dpi=120, sharey=True)
    pts = [r for r in rows if r.get("top1") is not None]
    from_onnx = all(_size_mb(r)[1] for r in pts) if pts else False
    axes = ((ax_size, lambda r: _size_mb(r)[0],
             "model size, MB (" + ("fp32 ONNX file" if from_onnx
                                   else "fp32 ONNX file, or 4 bytes/parameter") + "; log)"),
            (ax_macs, lambda r: float(r["macs"]) / 1e6, "MACs per image, millions (log)"))
    for ax, x_of, xlabel in axes:
        for src, marker, face in (("measured", "o", None), ("run report", "s", None),
                                  ("published", "^", "none")):
            sel = [r for r in pts if r.get("top1_source") == src]
            if sel:
                xs = [x_of(r) for r in sel]
                ys = [float(r["top1"]) for r in sel]
                kw = {"facecolors": face} if face else {}
                ax.scatter(xs, ys, marker=marker, s=55, label=_SOURCE_LABELS[src],
                           edgecolors="C0" if face else None, **kw)
                for r, x, y in zip(sel, xs, ys):
                    ax.annotate(str(r["model"]), (x, y), textcoords="offset points",
                                xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        # plain numbers ("3", "40"), not "3x10^0", which overlap on narrow ranges
        ax.xaxis.set_major_formatter(LogFormatter())
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_size.set_ylabel("top-1 accuracy (%)")
    fig.suptitle(title)
    missing = [str(r["model"]) for r in rows if r.get("top1") is None]
    if missing:
        fig.text(0.01, 0.01, "no accuracy: " + ", ".join(missing)[:220], fontsize=7, alpha=0.7)
    if pts:
        ax_size.legend(loc="best")
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def compare_outputs(out_dir: str | os.PathLike, json_path: str | os.PathLike | None = None,
                    stem: str = "compare") -> list[Path]:
    """The files :func:`write_compare` writes (what an input may not be)."""
    out = Path(out_dir)
    return [out / f"{stem}{ext}" for ext in (".md", ".json", ".png")] + (
        [Path(json_path)] if json_path is not None else [])


def write_compare(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                  title: str = "Model comparison", json_path: str | os.PathLike | None = None,
                  stem: str = "compare") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.json`` (the list of rows) and ``<stem>.png`` (accuracy vs
    size and vs MACs, log x) in ``out_dir``; also the JSON at ``json_path`` when given.
    Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(list(rows), indent=2, default=str)
    paths = {"markdown": atomic_write_text(out / f"{stem}.md", render_markdown(rows, title=title)),
             "json": atomic_write_text(out / f"{stem}.json", text + "\n"),
             "plot": plot_compare(rows, out / f"{stem}.png", title=title)}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        paths["json_extra"] = atomic_write_text(Path(json_path), text + "\n")
    return {k: Path(v) for k, v in paths.items()}
