"""``compresscnn compare``: one table and one plot for any set of models or run directories.

For each entry: parameters, MACs (:func:`compresscnn.measure.counting.count`), the size of its fp32
ONNX file (:func:`compresscnn.io.export.export_onnx`, checked in onnxruntime) and of its int8
version (onnxruntime dynamic quantization, QInt8 weights, per-tensor:
:func:`compresscnn.io.export.quantize_onnx_dynamic`), latency at each batch size in PyTorch and
onnxruntime (:func:`compresscnn.measure.evaluation.measure_latency`: the median of ``repeats`` runs with
``threads`` CPU threads, stated in the output), and top-1 accuracy:

* ``measured`` (here) when the entry has weights and data are given: the same loader
  (:func:`compresscnn.io.data.make_loaders`, at the entry's input size) and the same
  :func:`compresscnn.measure.evaluation.evaluate` as ``compresscnn run``, so a model scores the same
  in both;
* ``run report`` for a run directory whose ``report.json`` holds a measured top-1
  (fine-tuned, else zero-shot), on the images that run evaluated;
* ``published`` otherwise, for a model spec: taken from ``model.pretrained_cfg["published"]``
  (the loaded weights' metadata, e.g. torchvision's ``Weights.meta``), or, for a randomly
  initialised model, ``pretrained_cfg["reference"]`` (the architecture's published weights);
  never hard-coded here; on the dataset's whole evaluation set (ImageNet-1k: 50,000 images);
* none (``top1_source: null``) for a compressed structure that has not been trained.

Each row says which (``top1_source``) and on how many images (``top1_images``); the table
prints both next to the number.

An entry is one of

* a model spec string (``torchvision:alexnet``, ``cifar:squeezenet1_0?sr=0.25``);
* a run directory of ``compresscnn run`` (``report.json``, ``recipe.yaml``,
  ``model.safetensors``; rebuilt by :func:`compresscnn.runs.loading.load_compressed`);
* a dict ``{model: SPEC, weights, label, data, input_size}``, ``{run: DIR, label}`` or
  ``{recipe: FILE, weights, label}``: a compression recipe; if its output directory holds a
  finished run that run is used, else the recipe's rules are applied here to the model
  (``weights``, default random init) so its structure, size and speed can be compared
  before (or without) running it.

What is measured and how is a :class:`CompareSettings` (or a dict of its keys). The recipe
form (``compresscnn compare --recipe FILE``) is in :mod:`compresscnn.runs.compare_recipe`,
the table and plot in :mod:`compresscnn.runs.compare_output`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from torch import nn


from compresscnn.config import Bool, Closed, Enum, Int, ListOf, Nullable, Str, doc
from compresscnn.measure.counting import count
from compresscnn.measure.inspection import fit_report
from compresscnn.io.data import check_classes, make_loaders
from compresscnn.errors import CompressError
from compresscnn.measure.evaluation import evaluate, measure_latency, measure_latencies
from compresscnn.io.export import export_onnx, quantize_onnx_dynamic
from compresscnn.io.models import load_model, replace_head
from compresscnn.runs.loading import load_compressed
from compresscnn.util.progress import timed, doing
from compresscnn.recipe.schema import load_recipe
from compresscnn.core.surgery import compress
from compresscnn.runs.rundir import check_inputs_outside

__all__ = ["compare", "CompareSettings", "parse_data_arg", "CompareError", "INT8_METHOD"]

INT8_METHOD = ("onnxruntime quantize_dynamic (QInt8 weights, per-tensor; activations "
               "quantized at run time)")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt", ".safetensors", ".tflite")


class CompareError(CompressError):
    """A bad compare entry or compare recipe (one line naming the entry or key)."""


# --------------------------------------------------------------------------- entries

def _looks_like_path(s: str) -> bool:
    return "/" in s or "\\" in s or s.startswith((".", "~")) or s.lower().endswith(_WEIGHT_SUFFIXES)


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and (p / "recipe.yaml").is_file() and (p / "model.safetensors").is_file()


def _normalize(entry: Any, i: int) -> dict[str, Any]:
    """An entry as ``{"kind": "spec"|"run"|"recipe", ...}``."""
    where = f"compare[{i}]"
    if isinstance(entry, os.PathLike):
        entry = os.fspath(entry)
    if isinstance(entry, str):
        text = entry.strip()
        p = Path(text).expanduser()
        if _is_run_dir(p):
            return {"kind": "run", "run": str(p), "label": None}
        if p.is_dir():
            raise CompareError(f"{where}: {text} is a folder but not a compresscnn run "
                               "directory (recipe.yaml and model.safetensors missing)")
        if text.lower().endswith((".yaml", ".yml")):
            return {"kind": "recipe", "recipe": str(p), "label": None, "weights": None}
        if ":" not in text:
            raise CompareError(f"{where}: {text!r} is neither a model spec ('source:name', e.g. "
                               "'torchvision:alexnet') nor a run directory")
        return {"kind": "spec", "model": text, "label": None, "weights": None}
    if not isinstance(entry, Mapping):
        raise CompareError(f"{where}: expected a model spec, a run directory or a mapping, "
                           f"got {type(entry).__name__}")
    known = ("model", "run", "recipe", "weights", "label", "data", "input_size")
    bad = [k for k in entry if k not in known]
    if bad:
        raise CompareError(f"{where}.{bad[0]}: unknown key (known: {', '.join(known)})")
    forms = [k for k in ("model", "run", "recipe") if entry.get(k) is not None]
    if len(forms) != 1:
        raise CompareError(f"{where}: give exactly one of 'model' (a spec), 'run' (a run "
                           f"directory) or 'recipe' (a compression recipe), got {forms or 'none'}")
    kind = {"model": "spec"}.get(forms[0], forms[0])
    out = {"kind": kind, kind if kind != "spec" else "model": str(entry[forms[0]]),
           "label": entry.get("label"), "weights": entry.get("weights"),
           "data": entry.get("data"), "input_size": entry.get("input_size")}
    if kind == "run" and not _is_run_dir(Path(out["run"]).expanduser()):
        raise CompareError(f"{where}.run: {out['run']} is not a compresscnn run directory "
                           "(recipe.yaml and model.safetensors missing)")
    for key in ("label", "weights"):
        if out[key] is not None and not isinstance(out[key], str):
            raise CompareError(f"{where}.{key}: expected a string or null, got {out[key]!r}")
    if out["input_size"] is not None:
        s = out["input_size"]
        if not (isinstance(s, (list, tuple)) and len(s) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)):
            raise CompareError(f"{where}.input_size: expected [C, H, W] (three ints > 0), got {s!r}")
    return out


def _reads(norm: Sequence[Mapping[str, Any]], dmap: Mapping[str, Mapping[str, Any]]
           ) -> list[tuple[str, Any]]:
    """Every path the entries and the data sections read, as ``(what, path)``."""
    out: list[tuple[str, Any]] = []
    for i, e in enumerate(norm):
        for key in ("run", "recipe", "weights"):
            if isinstance(e.get(key), str):
                out.append((f"compare[{i}].{key}", e[key]))
        for name, sec in _data_map(e.get("data")).items() if e.get("data") else ():
            out.append((f"compare[{i}].data.{name}.root", sec.get("root")))
    for name, sec in dmap.items():
        out.append((f"data.{name}.root", sec.get("root")))
    return out


def parse_data_arg(text: str) -> dict[str, Any]:
    """``"imagenet=PATH"`` (CLI ``--data``) -> ``{"imagenet": {"dataset": "imagenet", "root":
    PATH}}``; ``cifar10=PATH`` likewise."""
    name, eq, path = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if not eq or not path.strip() or name not in ("imagenet", "cifar10", "fashion_mnist"):
        raise CompareError(f"--data {text!r}: expected DATASET=PATH with DATASET one of "
                           "imagenet, cifar10, fashion_mnist")
    return {name: {"dataset": name, "root": path.strip()}}


def _data_map(data: Any, where: str = "data") -> dict[str, dict[str, Any]]:
    """Global ``data`` as ``{dataset: data section}``: a data section (has ``dataset``), or a
    mapping ``{dataset: section or PATH}``, or None."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise CompareError(f"{where}: expected a mapping (a data section, or dataset: section), "
                           f"got {data!r}")
    if "dataset" in data:
        return {str(data["dataset"]).lower(): dict(data)}
    out: dict[str, dict[str, Any]] = {}
    for name, sec in data.items():
        if sec is None:
            continue
        if isinstance(sec, (str, os.PathLike)):
            sec = {"root": os.fspath(sec)}
        if not isinstance(sec, Mapping):
            raise CompareError(f"{where}.{name}: expected a data section or a path, got {sec!r}")
        out[str(name).lower()] = {"dataset": str(name).lower(), **dict(sec)}
    return out


def _dataset_for(model: nn.Module) -> str:
    pc = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(pc.get("input_size") or (3, 224, 224))
    if int(size[0]) == 1:
        return "fashion_mnist"
    return "imagenet" if int(pc.get("num_classes") or 1000) == 1000 else "cifar10"


# --------------------------------------------------------------------------- building

def _build(e: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The model of an entry and what is known about it (label, weights, run report...)."""
    info: dict[str, Any] = {"kind": e["kind"], "weights": e.get("weights"), "notes": []}
    if e["kind"] == "spec":
        model = load_model(e["model"], e.get("weights"))
        info["spec"] = e["model"]
        wname = e.get("weights")
        label = e["model"].split(":", 1)[1]
        if wname and _looks_like_path(wname):
            label += f" ({Path(wname).name})"
        info["label"] = e.get("label") or label
        return model, info
    if e["kind"] == "lowrank":
        return _build_lowrank(e)
    if e["kind"] == "recipe":
        recipe = load_recipe(e["recipe"])
        out = Path(recipe["output"])
        info["recipe"] = str(e["recipe"])
        if _is_run_dir(out) and (out / "report.json").is_file():
            return _build({"kind": "run", "run": str(out),
                           "label": e.get("label") or recipe.get("name")})
        spec = recipe["model"]["spec"]
        model = load_model(spec, e.get("weights"))
        if recipe["model"].get("num_classes"):
            replace_head(model, recipe["model"]["num_classes"])
        size = recipe["model"].get("input_size") or model.pretrained_cfg.get("input_size")
        cfg = model.pretrained_cfg
        model, p = compress(model, recipe["rules"], tuple(size), target=recipe.get("target"))
        model.pretrained_cfg = cfg
        info.update(spec=spec, label=e.get("label") or recipe.get("name"), compressed_from=spec)
        info["notes"].append(f"not trained: rules of {Path(e['recipe']).name} applied here; run "
                             f"`compresscnn run {e['recipe']}` for its accuracy")
        return model.eval(), info
    # a run directory
    run = Path(e["run"]).expanduser()
    model = load_compressed(run)
    info.update(run=str(run), label=e.get("label") or run.name,
                spec=(getattr(model, "pretrained_cfg", {}) or {}).get("spec"))
    rep_path = run / "report.json"
    if rep_path.is_file():
        try:
            info["report"] = json.loads(rep_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CompareError(f"{rep_path}: unreadable report ({exc})") from None
    return model, info


def _build_lowrank(e: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A spec entry factorized to ``e["params"]`` of its parameters, data-free, with the
    rule set :func:`compresscnn.measure.inspection.fit_report` recommends for it."""
    model = load_model(e["model"], e.get("weights"))
    cfg = model.pretrained_cfg
    size = tuple(e.get("input_size") or cfg.get("input_size") or (3, 224, 224))
    doing(f"factorizing {e['model']} to {e['params']:.4f} of its parameters")
    rules = fit_report(model, size)["rules"]
    model, _ = compress(model, rules, size, target={"params": e["params"]})
    model.pretrained_cfg = cfg
    methods = ", ".join(f"{r['method']} on {r['match']}" for r in rules)
    note = (f"factorized here to the size of {e['size_of']} ({methods}; data-free, not "
            "fine-tuned)")
    return model.eval(), {"kind": "lowrank", "weights": e.get("weights"), "spec": e["model"],
                          "label": e["label"], "compressed_from": e["model"], "notes": [note]}


def _size_matched(norm: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
                  ) -> list[tuple[int, dict[str, Any]]]:
    """(position, entry) of the low-rank copy of every spec entry with more than 1.1 times
    the parameters of the smallest entry, sized to it."""
    small = min(rows, key=lambda r: r["params"])
    out = []
    for i, (e, r) in enumerate(zip(norm, rows)):
        if e["kind"] == "spec" and r["params"] > 1.1 * small["params"]:
            out.append((i, {**e, "kind": "lowrank", "params": small["params"] / r["params"],
                            "size_of": small["model"],
                            "label": f"{r['model']} low-rank to {small['model']}'s size"}))
    return out


#: images in the evaluation set published figures are measured on, by dataset name
_PUBLISHED_IMAGES = {"imagenet-1k": 50_000, "cifar-10": 10_000}


def _run_accuracy(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The measured top-1 of a run: trained from scratch (a `train:` run), fine-tuned if it
    was, else zero-shot."""
    if not report:
        return None
    for stage in ("trained", "finetuned", "compressed"):
        r = report.get(stage)
        if isinstance(r, Mapping) and r.get("top1") is not None:
            return {"top1": float(r["top1"]), "top5": r.get("top5"), "n": r.get("n"),
                    "stage": stage, "agreement": r.get("agreement")}
    return None


def _published(model: nn.Module, kind: str) -> dict[str, Any]:
    """Published metrics of a spec entry: of the loaded weights, else of the architecture's
    reference weights (a randomly initialised torchvision model)."""
    if kind != "spec":
        return {}
    pc = getattr(model, "pretrained_cfg", {}) or {}
    for key in ("published", "reference"):
        pub = pc.get(key) or {}
        if pub.get("acc@1") is not None:
            return dict(pub)
    return {}


def _measure_accuracy(model: nn.Module, data_cfg: dict[str, Any], size: Sequence[int],
                      progress: bool) -> dict[str, Any]:
    """Top-1/top-5 on the data's eval source, exactly as ``compresscnn run`` measures it."""
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    check_classes(data_cfg, pcfg.get("num_classes"), pcfg.get("spec") or type(model).__name__)
    _, loader = make_loaders(data_cfg, pcfg, train=False, test=True, input_size=size)
    r = evaluate(model, loader, topk=(1, 5), device="cpu", progress=progress)
    return {"top1": r["top1"], "top5": r.get("top5"), "n": r["n"]}


# --------------------------------------------------------------------------- compare

def _accuracy(e: dict[str, Any], info: dict[str, Any], model: nn.Module,
              dmap: dict[str, dict[str, Any]], size: Sequence[int], *,
              progress: bool) -> dict[str, Any]:
    """The row's ``top1``, ``top5``, ``top1_source``, ``top1_images`` and ``accuracy`` (where
    the number comes from): a run's report, else measured here, else published."""
    acc = _run_accuracy(info.get("report")) if info["kind"] == "run" else None
    dcfg = e.get("data")
    if isinstance(dcfg, str):
        dcfg = next(iter(parse_data_arg(dcfg).values()))
    if dcfg is None:
        dcfg = dmap.get(_dataset_for(model))
    if acc is not None:
        return {"top1": acc["top1"], "top5": acc.get("top5"), "top1_source": "run report",
                "top1_images": acc.get("n"),
                "accuracy": {"source": "run report", "how": f"report.json ({acc['stage']})",
                             "n": acc.get("n"), "agreement": acc.get("agreement")}}
    if dcfg is not None and (info["kind"] == "run" or e.get("weights") is not None):
        r = _measure_accuracy(model, dict(dcfg), size, progress)
        return {"top1": r["top1"], "top5": r.get("top5"), "top1_source": "measured",
                "top1_images": r["n"],
                "accuracy": {"source": "measured", "how": "evaluated here",
                             "dataset": dcfg.get("dataset"), "root": str(dcfg.get("root")),
                             "n": r["n"]}}
    pub = _published(model, info["kind"])
    if not pub:
        return {}
    pc = getattr(model, "pretrained_cfg", {}) or {}
    loaded = bool((pc.get("published") or {}).get("acc@1") is not None)
    n = _PUBLISHED_IMAGES.get(str(pub.get("dataset") or "").lower())
    if not loaded:
        info["notes"].append("published figure of the architecture's reference weights (not "
                             "loaded here: structure and speed only)")
    return {"top1": pub.get("acc@1"), "top5": pub.get("acc@5"), "top1_source": "published",
            "top1_images": n,
            "accuracy": {"source": "published", "how": pub.get("source"),
                         "dataset": pub.get("dataset"), "n": n, "weights_loaded": loaded}}


def _entry_row(e: dict[str, Any], o: dict[str, Any]) -> dict[str, Any]:
    """One entry's row: build it, count it, its accuracy, its ONNX sizes and latencies."""
    model, info = _build(e)
    model.eval()
    pc = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(int(s) for s in (e.get("input_size") or o["input_size"]
                                  or pc.get("input_size") or (3, 224, 224)))
    counts = count(model, size)
    row: dict[str, Any] = {
        "model": info["label"], "kind": info["kind"], "spec": info.get("spec"),
        "weights": info.get("weights") if info["kind"] != "run" else None,
        "run": info.get("run"), "recipe": info.get("recipe"), "input_size": list(size),
        "params": counts["params"], "macs": counts["macs"],
        "onnx_bytes": None, "onnx_int8_bytes": None, "int8_method": None,
        "int8_top1": None, "int8_agreement": None,
        "top1": None, "top5": None, "top1_source": None, "top1_images": None,
        "accuracy": None,
        "threads": o["threads"], "latency_ms": {}, "latency": [], "notes": info["notes"],
    }
    doing("measuring accuracy")
    row.update(_accuracy(e, info, model, o["dmap"], size, progress=o["progress"]))
    onnx_path = _onnx_sizes(row, model, size, info["label"], o) if o["onnx"] else None
    if o["latency"]:
        doing("timing latency")
        _latencies(row, model, size, onnx_path, o)
    return row


def _onnx_sizes(row: dict[str, Any], model: nn.Module, size: tuple[int, ...], label: str,
                o: dict[str, Any]) -> Path | None:
    """fp32 and int8 ONNX file sizes into ``row``; the fp32 file's path (None if it failed)."""
    stem = _slug(label)
    while stem in o["used"]:
        stem += "_"
    o["used"].add(stem)
    o["workdir"].mkdir(parents=True, exist_ok=True)
    onnx_path = o["workdir"] / f"{stem}.onnx"
    try:
        ex = export_onnx(model, onnx_path, size, {"check_batch": [1, 2]})
        row["onnx_bytes"] = ex["bytes"]
        row["onnx_exporter"] = ex["exporter"]
    except Exception as exc:  # one model's exporter failure must not sink the table
        row["notes"].append(f"ONNX export failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
        onnx_path = None
    run_int8 = _run_int8(row)
    if onnx_path is not None and run_int8 is not None:
        # the run's own int8 file (export.quantize: calibrated on its training images), with
        # the top-1 and agreement its report measured
        (o["workdir"] / f"{stem}.int8.onnx").write_bytes(run_int8[0].read_bytes())
        rep = run_int8[1]
        row["onnx_int8_bytes"] = rep.get("bytes")
        row["int8_method"] = (f"the run's export.quantize ({rep.get('mode')} int8"
                              + (", weights per channel" if rep.get("per_channel") else "")
                              + ")")
        row["int8_top1"], row["int8_agreement"] = rep.get("top1"), rep.get("agreement")
    elif onnx_path is not None and o["quantize"]:
        doing("quantizing the ONNX file to int8")
        q = o["workdir"] / f"{stem}.int8.onnx"
        try:
            row["onnx_int8_bytes"] = quantize_onnx_dynamic(onnx_path, q)
            row["int8_method"] = INT8_METHOD
        except Exception as exc:
            row["notes"].append(f"int8 quantization failed: {type(exc).__name__}: {exc}"[:300])
    return onnx_path


def _run_int8(row: dict[str, Any]) -> tuple[Path, Mapping[str, Any]] | None:
    """A run directory's int8 file and its report entry, when the run made one."""
    if not row.get("run"):
        return None
    run = Path(row["run"])
    try:
        rep = json.loads((run / "report.json").read_text(encoding="utf-8")).get("int8")
    except (OSError, ValueError):
        return None
    if not rep or not (run / str(rep.get("path"))).is_file():
        return None
    return run / str(rep["path"]), rep


def _latencies(row: dict[str, Any], model: nn.Module, size: tuple[int, ...],
               onnx_path: Path | None, o: dict[str, Any]) -> None:
    """Median latency at each batch in PyTorch, onnxruntime and onnxruntime int8."""
    runs: list[tuple[str, Any]] = [("torch", model)]
    if onnx_path is not None:
        int8 = o["workdir"] / f"{onnx_path.stem}.int8.onnx"
        runs.append(("ort", onnx_path))
        if row["onnx_int8_bytes"] is not None:
            runs.append(("ort_int8", int8))
        if "openvino" in o.get("runtimes", ()):
            runs.append(("ov", onnx_path))
            if row["onnx_int8_bytes"] is not None and "static" in str(row["int8_method"]):
                runs.append(("ov_int8", int8))
    for b in o["batches"]:
        for key, target in runs:
            rt = {"torch": "torch", "ov": "openvino", "ov_int8": "openvino"}.get(key,
                                                                              "onnxruntime")
            try:
                r = (measure_latencies({key: target}, size, runtime=rt, threads=o["threads"],
                                       warmup=o["warmup"], repeats=o["repeats"], batch=b)[key]
                     if rt == "openvino" else
                     measure_latency(target, size, runtime=rt, threads=o["threads"],
                                     warmup=o["warmup"], repeats=o["repeats"], batch=b,
                                     device="cpu"))
            except Exception as exc:
                row["notes"].append(f"{key} latency at batch {b} failed: "
                                    f"{type(exc).__name__}: {exc}"[:300])
                continue
            row["latency_ms"][f"{key}_b{b}"] = round(float(r["median_ms"]), 4)
            row["latency"].append({"runtime": key, **r})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


_RUNTIMES = ("torch", "onnxruntime", "openvino")


class CompareSettings(Closed):
    """How :func:`compare` measures every entry: the keys of a compare recipe besides
    ``title``, ``compare`` and ``output``, and the options of ``compresscnn compare``."""

    data: Any = doc(
        "A data section, or {dataset: section or path}: data for the entries with weights (an "
        "entry's own `data` wins); the dataset is chosen by the model (1000 classes: imagenet; "
        "1 channel: fashion_mnist; else cifar10).", None)
    input_size: Nullable(ListOf(Int(1), length=3, what="[C, H, W], three ints > 0")) = doc(
        "One input size for every entry (default: each model's).", None)
    latency_batches: ListOf(Int(1), min_len=1) = doc("Batch sizes timed.", [1, 32])
    threads: Int(1) = doc("CPU threads while timing.", 2)
    repeats: Int(1) = doc("Timed runs per measurement (the median is reported).", 20)
    warmup: Int(0) = doc("Untimed runs before each measurement.", 3)
    quantize: Bool = doc("Also write and measure the int8 ONNX file.", True)
    onnx: Bool = doc("Export fp32 ONNX (file size, onnxruntime latency).", True)
    latency: Bool = doc("Measure latency.", True)
    runtimes: ListOf(Enum(*_RUNTIMES), min_len=1) = doc(
        "Runtimes to time in (`openvino` needs the `runtimes` extra).", ["torch", "onnxruntime"])
    weights_for: Optional[dict[str, str]] = doc(
        "{spec: weights}: the weights of these spec entries.", None)
    default_weights: Nullable(Str()) = doc(
        "Weights of spec entries that give none (e.g. DEFAULT: download the published "
        "weights).", None)
    match_size: Bool = doc(
        "Also compare every model spec that has more parameters than the smallest entry "
        "factorized to that entry's parameter count (the rules `compresscnn inspect` "
        "recommends for it under one global `params` target, data-free, not fine-tuned): "
        "\"SqueezeNet, or AlexNet made as small?\". Its top-1 is measured (zero-shot) when "
        "the spec has weights and data are given, else it has none.", False)

    @classmethod
    def of(cls, settings: "CompareSettings | Mapping[str, Any] | None") -> "CompareSettings":
        """``settings`` as a validated object (a dict is validated; a problem is a one-line
        :class:`CompareError` naming the key)."""
        return cls.coerce(settings, "compare", CompareError)


def compare(entries: Sequence[Any], settings: CompareSettings | Mapping[str, Any] | None = None,
            *, workdir: str | os.PathLike, log: Any = None,
            out_files: Sequence[str | os.PathLike] = (),
            reads: Sequence[tuple[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per entry (see the module docstring for entries and accuracy sources).

    ``settings``: a :class:`CompareSettings` or a dict of its keys (what is measured and
    how). ONNX files go in ``workdir``. Before anything is measured, no input (an entry's run
    folder, recipe or weights, a data root, or one of ``reads``) may lie inside ``workdir``
    or be one of ``out_files`` (the files the caller will write), and neither may lie inside
    an input folder (:func:`compresscnn.runs.rundir.check_inputs_outside`). ``onnx=False`` /
    ``latency=False`` skip the slow parts
    (``quantize=False`` only the int8 file).
    A run directory that made an int8 file (``export.quantize``) brings it, with its measured
    top-1 (``int8_top1``, ``int8_agreement``). ``runtimes`` with ``"openvino"``: the fp32 file
    and a static int8 one are timed in OpenVINO too (``ov_b1``, ``ov_int8_b1``; the
    ``runtimes`` extra).

    Each row holds ``model`` (the label), ``kind``, ``spec``, ``weights``, ``input_size``,
    ``params``, ``macs``, ``onnx_bytes``, ``onnx_int8_bytes``, ``int8_method``,
    ``top1``, ``top5``, ``top1_source`` (``"measured"`` here, ``"run report"``,
    ``"published"`` or None), ``top1_images`` (how many images that top-1 is measured on),
    ``accuracy`` (where it comes from), ``threads``, ``latency_ms`` (``{"torch_b1": median
    ms, "ort_b1", "ort_int8_b1", ...}``), ``latency`` (the full measurements) and ``notes``.
    """
    cfg = CompareSettings.of(settings)
    weights_for = cfg.weights_for or {}
    norm = [_normalize(e, i) for i, e in enumerate(entries)]
    if not norm:
        raise CompareError("compare: no models given")
    for e in norm:
        if e["kind"] == "spec":
            if e["model"] in weights_for:
                e["weights"] = weights_for[e["model"]]
            elif e.get("weights") is None and cfg.default_weights is not None:
                e["weights"] = cfg.default_weights
    unknown = set(weights_for) - {e.get("model") for e in norm}
    if unknown:
        raise CompareError(f"--weights-for {sorted(unknown)[0]}: no such model among the entries")
    if "openvino" in cfg.runtimes:
        from compresscnn.measure.timing import check_runtime
        check_runtime("openvino", "compare --runtimes")
    dmap = _data_map(cfg.data)
    check_inputs_outside([*reads, *_reads(norm, dmap)], folders=[workdir], files=out_files,
                         command="compare")
    opts = {"input_size": cfg.input_size, "dmap": dmap, "workdir": Path(workdir),
            "runtimes": tuple(cfg.runtimes), "onnx": cfg.onnx, "quantize": cfg.quantize,
            "latency": cfg.latency, "threads": cfg.threads, "batches": list(cfg.latency_batches),
            "repeats": cfg.repeats, "warmup": cfg.warmup, "progress": log is not None,
            "used": set()}
    rows = [_timed_row(e, opts, log, f"model {i} of {len(norm)}")
            for i, e in enumerate(norm, 1)]
    if cfg.match_size:
        extra = _size_matched(norm, rows)
        for n, (i, e) in enumerate(reversed(extra), 1):
            rows.insert(i + 1, _timed_row(e, opts, log, f"low-rank copy {n} of {len(extra)}"))
    return rows


def _timed_row(e: dict[str, Any], opts: dict[str, Any], log: Any, what: str) -> dict[str, Any]:
    name = e.get("label") or e.get("model") or e.get("run") or e.get("recipe")
    t0 = time.perf_counter()
    with timed(None, "compare", f"{name} ({what})", quiet=log is None):
        row = _entry_row(e, opts)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    if log:
        log(f"[compare] {row['model']}: {row['params']:,} params, top1 {row['top1']} "
            f"({row['top1_source']}, {row['top1_images']} images), {row['seconds']} s")
    return row
