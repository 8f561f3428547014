"""Load a model by spec, with its weights and its preprocessing (``model.pretrained_cfg``).

Specs: ``torchvision:<name>``, ``timm:<name>``, ``cifar:resnet{20,32,44,56}``, ``fmnist:cnn``.
Every local weights file, whatever the spec, goes through :func:`read_checkpoint` and
:func:`load_weights`: ``torch.load(..., weights_only=True)`` always (a checkpoint is data, and
unpickling arbitrary objects runs arbitrary code), and every failure is a
:class:`~compresscnn.errors.CheckpointError` whose one-line message names the file. A
TensorFlow Lite file (``.tflite``) for a torchvision model is read by
:mod:`compresscnn.io.models.tflite_weights` instead (a flatbuffer, no pickle), with the same
kind of errors.

``model.pretrained_cfg`` follows timm's convention (a plain dict) so the data pipeline and
reports read one thing for every source:

``input_size`` (C, H, W), ``mean``, ``std``, ``num_classes``, ``resize`` (shorter side, int or
None), ``crop`` (int or None), ``interpolation`` ("bilinear", ...), ``published`` (metrics
published for *the loaded weights*, {} when unknown), ``reference`` (published metrics of the
architecture's reference weights when those are not the ones loaded, else None),
``weights`` (what was loaded: an enum name, a file path, or None) and ``spec``.
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compresscnn.config import MODEL_SOURCES
from compresscnn.errors import ModelError
from compresscnn.io.models.checkpoints import Checkpoint, _one_line, load_weights
from compresscnn.io.models.cifar_resnet import cifar_resnet
from compresscnn.io.models.cifar_zoo import CIFAR_ZOO, parse_hparams
from compresscnn.io.models.small import FMNIST_MEAN, FMNIST_STD, FashionCNN
from compresscnn.io.models.tflite_weights import (TFLITE_SUFFIX, is_tflite_path, load_tflite,
                                                  tf_same_padding)
from compresscnn.io.zoos import IMAGENET_MEAN, IMAGENET_STD, unknown_name as _unknown_name

__all__ = [
    "load_model",
    "load_architecture",
    "replace_head",
    "model_names",
    "parse_spec",
]


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt", ".safetensors", TFLITE_SUFFIX)
SOURCES = MODEL_SOURCES

# akamaster/pytorch_resnet_cifar10 (BSD-2-Clause): claimed top-1 on the original CIFAR-10
# test set (also stored as ``best_prec1`` inside each checkpoint), download URL and sha256.
_AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_AKAMASTER = {
    20: ("resnet20-12fca82f.th", 91.78,
         "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    32: ("resnet32-d509ac18.th", 92.78,
         "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    44: ("resnet44-014dd654.th", 93.14,
         "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    56: ("resnet56-4bfd9763.th", 93.62,
         "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
}

# Third-party checkpoints whose published figures we know, by sha256 of the file.
_KNOWN_FILES: dict[str, dict[str, Any]] = {
    sha: {"dataset": "CIFAR-10", "acc@1": acc,
          "source": f"akamaster/pytorch_resnet_cifar10 {fname} (claimed)"}
    for fname, acc, sha in _AKAMASTER.values()
}
_KNOWN_FILES["0f8879d2437d11e34094304d947be5cd0374b694458262658d7986824749020a"] = {
    "dataset": "ImageNet-1K", "acc@1": 56.34, "acc@5": 79.12,
    "source": "ONNX model zoo squeezenet1.1 (claimed)",
}

_FMNIST_ASSET = "fmnist_cnn.safetensors"


# --------------------------------------------------------------------------------------
# specs


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"source:name"`` into ``(source, name)``; a malformed spec is a ModelError."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelError(
            f"model spec {spec!r} must be 'source:name' with source one of "
            f"{', '.join(SOURCES)} (e.g. 'torchvision:resnet18', 'cifar:resnet20')"
        )
    source, name = spec.split(":", 1)
    source, name = source.strip().lower(), name.strip()
    if source not in SOURCES:
        close = difflib.get_close_matches(source, SOURCES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(
            f"unknown model source {source!r} in spec {spec!r}{hint}; "
            f"known sources: {', '.join(SOURCES)}"
        )
    if not name:
        raise ModelError(f"model spec {spec!r} has no model name after {source!r}")
    return source, name


def _torchvision_names() -> list[str]:
    import torchvision  # heavy: imported only when torchvision models are asked for

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm  # heavy: imported only when timm models are asked for

    return sorted(timm.list_models())


def _cifar_names() -> list[str]:
    return [f"resnet{d}" for d in _AKAMASTER]


def model_names(source: str | None = None) -> list[str]:
    """Every spec that :func:`load_model` accepts (optionally only one source's)."""
    listers: dict[str, Callable[[], list[str]]] = {
        "torchvision": _torchvision_names,
        "timm": _timm_names,
        "cifar": _cifar_names,
        "fmnist": lambda: ["cnn"],
    }
    sources = [source] if source else list(SOURCES)
    out: list[str] = []
    for s in sources:
        if s not in listers:
            raise ModelError(f"unknown model source {s!r}; known sources: {', '.join(SOURCES)}")
        out += [f"{s}:{n}" for n in listers[s]()]
    return out


def _looks_like_path(weights: str) -> bool:
    return (
        weights.lower().endswith(CHECKPOINT_SUFFIXES)
        or os.sep in weights
        or "/" in weights
        or Path(weights).expanduser().exists()
    )


def _published_from_file(ckpt: Checkpoint) -> dict[str, Any]:
    """Published metrics for a file: known third-party files by hash, else its own metadata."""
    if ckpt.sha256 in _KNOWN_FILES:
        return dict(_KNOWN_FILES[ckpt.sha256])
    md = ckpt.metadata
    out: dict[str, Any] = {}
    for src, dst in (("acc@1", "acc@1"), ("acc@5", "acc@5"), ("best_prec1", "acc@1"),
                     ("best_acc1", "acc@1"), ("best_acc", "acc@1")):
        if src in md and dst not in out:
            try:
                out[dst] = round(float(md[src]), 4)
            except (TypeError, ValueError):
                pass
    if out:
        if "dataset" in md:
            out["dataset"] = str(md["dataset"])
        out["source"] = f"metadata of {ckpt.path.name}"
    return out


# --------------------------------------------------------------------------------------
# per-source builders; each returns (model, pretrained_cfg)


def _cfg(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": 1000,
        "resize": 256,
        "crop": 224,
        "interpolation": "bilinear",
        "published": {},
        "reference": None,
        "weights": None,
        "spec": "",
    }
    base.update(kw)
    return base


def _first(x: Any) -> int | None:
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return int(x[0]) if x else None
    return int(x)


def _tv_meta(weights_enum: Any) -> dict[str, Any]:
    """Preprocessing and published figures from a torchvision Weights enum, no download."""
    meta = weights_enum.meta
    published: dict[str, Any] = {}
    for dataset, metrics in (meta.get("_metrics") or {}).items():
        published = {"dataset": dataset, **{k: float(v) for k, v in metrics.items()}}
        break
    if "_ops" in meta:
        published["gflops"] = float(meta["_ops"])
    if "_file_size" in meta:
        published["file_size_mb"] = float(meta["_file_size"])
    published["source"] = f"torchvision {type(weights_enum).__name__}.{weights_enum.name} metadata"
    pre: dict[str, Any] = {}
    try:
        t = weights_enum.transforms()  # a module holding numbers; downloads nothing
        crop = _first(getattr(t, "crop_size", None))
        pre = {
            "resize": _first(getattr(t, "resize_size", None)),
            "crop": crop,
            "mean": tuple(float(m) for m in t.mean),
            "std": tuple(float(s) for s in t.std),
            "interpolation": getattr(getattr(t, "interpolation", None), "value", "bilinear"),
        }
        if crop:
            pre["input_size"] = (3, crop, crop)
    except Exception:  # non-classification presets: keep ImageNet defaults
        pass
    if meta.get("categories"):
        pre["num_classes"] = len(meta["categories"])
    return {"published": published, **pre}


def _build_torchvision(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    import torchvision  # heavy: imported only when a torchvision model is asked for
    from torchvision.models import get_model, get_model_weights

    known = _torchvision_names()
    if name not in known:
        raise _unknown_name("torchvision", name, known)
    enum_cls = get_model_weights(name)
    members = list(enum_cls.__members__)
    default = enum_cls.DEFAULT if "DEFAULT" in members else None
    ref = _tv_meta(default) if default is not None else {}
    spec = f"torchvision:{name}"

    if weights is not None and not _looks_like_path(weights):
        key = "DEFAULT" if weights.lower() in ("default", "pretrained") else weights
        if key not in members:
            raise ModelError(
                f"unknown weights {weights!r} for {spec}; use one of {', '.join(members)}, "
                "a local .pth/.pt/.th/.safetensors file, or null for random init"
            )
        w = enum_cls[key]
        try:
            model = get_model(name, weights=w)
        except Exception as exc:  # no network, bad cache, ...
            raise ModelError(
                f"could not get torchvision weights {type(w).__name__}.{w.name} for {spec} "
                f"from {w.url} ({_one_line(exc)}); offline, pass a local weights file instead"
            ) from None
        info = _tv_meta(w)
        cfg = _cfg(**info, weights=f"{type(w).__name__}.{w.name}", spec=spec)
        return model, cfg

    model = get_model(name, weights=None)
    info = {k: v for k, v in ref.items() if k != "published"}
    cfg = _cfg(**info, spec=spec, reference=ref.get("published") or None)
    if weights is not None and is_tflite_path(weights):
        # a TensorFlow Lite file: its layers, its padding, its input range
        info = load_tflite(model, weights, spec=spec)
        cfg.update(info, weights=str(Path(weights).expanduser()))
    elif weights is not None:
        ckpt = load_weights(model, weights, spec=spec)
        cfg["weights"] = str(ckpt.path)
        cfg["published"] = _published_from_file(ckpt)
    del torchvision
    return model, cfg


def _build_timm(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    import timm  # heavy: imported only when a timm model is asked for

    if not timm.is_model(name):
        raise _unknown_name("timm", name, _timm_names())
    spec = f"timm:{name}"
    pretrained = weights is not None and weights.lower() in ("default", "pretrained")
    if weights is not None and not pretrained and not _looks_like_path(weights):
        raise ModelError(
            f"unknown weights {weights!r} for {spec}; use 'DEFAULT' (timm's pretrained weights), "
            "a local .pth/.pt/.safetensors file, or null for random init"
        )
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as exc:
        if pretrained:
            raise ModelError(
                f"could not get timm pretrained weights for {spec} ({_one_line(exc)}); "
                "offline, pass a local weights file instead"
            ) from None
        raise ModelError(f"cannot build {spec}: {_one_line(exc)}") from None
    tcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    input_size = tuple(tcfg.get("input_size", (3, 224, 224)))
    crop_pct = float(tcfg.get("crop_pct", 0.875) or 0.875)
    crop = int(input_size[-1])
    cfg = _cfg(
        input_size=input_size,
        mean=tuple(tcfg.get("mean", IMAGENET_MEAN)),
        std=tuple(tcfg.get("std", IMAGENET_STD)),
        num_classes=int(tcfg.get("num_classes", getattr(model, "num_classes", 1000))),
        # timm's eval transform: resize to floor(crop / crop_pct), centre crop
        resize=int(math.floor(crop / crop_pct)),
        crop=crop,
        interpolation=str(tcfg.get("interpolation", "bilinear")),
        spec=spec,
        weights="pretrained" if pretrained else None,
    )
    if weights is not None and not pretrained:
        ckpt = load_weights(model, weights, spec=spec)
        cfg["weights"] = str(ckpt.path)
        cfg["published"] = _published_from_file(ckpt)
    # keep timm's own keys (crop_pct, first_conv, classifier...) for timm's helpers
    model.pretrained_cfg = {**tcfg, **cfg}
    return model, model.pretrained_cfg


def _download_akamaster(depth: int) -> Path:
    fname, _, sha = _AKAMASTER[depth]
    url = _AKAMASTER_URL + fname
    dest = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha[:8], progress=False)
        except Exception as exc:
            raise ModelError(
                f"could not download {url} ({_one_line(exc)}); offline, pass the local "
                f"{fname} file as weights instead"
            ) from None
    return dest


def _build_cifar_zoo(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The own CIFAR nets of :mod:`compresscnn.io.models.cifar_zoo` (``"?k=v&..."`` hparams)."""
    base, hp = parse_hparams(name)
    spec = f"cifar:{name}"
    try:
        model = CIFAR_ZOO[base][0](**hp)
    except ValueError as exc:
        raise ModelError(f"{spec}: {exc}") from None
    cfg = _cfg(input_size=(3, 32, 32), num_classes=10, resize=None, crop=None, spec=spec,
               hparams=dict(getattr(model, "hparams", hp)))
    if weights is not None:
        if weights.lower() in ("default", "pretrained"):
            raise ModelError(f"{spec} has no published weights; train it (recipes/"
                             "cifar10_scratch.yaml) and pass its model.safetensors")
        ckpt = load_weights(model, weights, spec=spec)
        cfg["weights"] = str(ckpt.path)
        cfg["published"] = _published_from_file(ckpt)
    return model, cfg


def _build_cifar(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    if name.partition("?")[0].strip() in CIFAR_ZOO:  # own CIFAR nets, "?k=v&..." hparams
        return _build_cifar_zoo(name, weights)
    known = _cifar_names()
    if name not in known:
        raise _unknown_name("cifar", name, known)
    depth = int(name[len("resnet"):])
    spec = f"cifar:{name}"
    model = cifar_resnet(depth)
    fname, acc, _ = _AKAMASTER[depth]
    reference = {"dataset": "CIFAR-10", "acc@1": acc,
                 "source": f"akamaster/pytorch_resnet_cifar10 {fname} (claimed)"}
    cfg = _cfg(input_size=(3, 32, 32), num_classes=10, resize=None, crop=None, spec=spec,
               reference=reference)
    if weights is not None:
        if weights.lower() in ("default", "pretrained"):
            path: str | Path = _download_akamaster(depth)
        elif _looks_like_path(weights):
            path = weights
        else:
            raise ModelError(
                f"unknown weights {weights!r} for {spec}; use 'DEFAULT' (akamaster's published "
                f"{fname}), a local weights file, or null for random init"
            )
        ckpt = load_weights(model, path, spec=spec)
        cfg["weights"] = str(ckpt.path)
        cfg["published"] = _published_from_file(ckpt)
        if cfg["published"].get("source", "").startswith("akamaster"):
            cfg["reference"] = None
    return model, cfg


def _build_fmnist(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    if name != "cnn":
        raise _unknown_name("fmnist", name, ["cnn"])
    spec = "fmnist:cnn"
    model = FashionCNN()
    cfg = _cfg(input_size=(1, 28, 28), mean=FMNIST_MEAN, std=FMNIST_STD, num_classes=10,
               resize=None, crop=None, spec=spec)
    if weights is not None:
        if weights.lower() in ("default", "pretrained"):
            res = importlib.resources.files("compresscnn") / "assets" / _FMNIST_ASSET
            with importlib.resources.as_file(res) as asset:
                ckpt = load_weights(model, asset, spec=spec)
            cfg["weights"] = "DEFAULT"
        elif _looks_like_path(weights):
            ckpt = load_weights(model, weights, spec=spec)
            cfg["weights"] = str(ckpt.path)
        else:
            raise ModelError(
                f"unknown weights {weights!r} for {spec}; use 'DEFAULT' (the packaged "
                f"{_FMNIST_ASSET}), a local weights file, or null for random init"
            )
        cfg["published"] = _published_from_file(ckpt)
    return model, cfg


_BUILDERS: dict[str, Callable[[str, str | None], tuple[nn.Module, dict[str, Any]]]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "cifar": _build_cifar,
    "fmnist": _build_fmnist,
}


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` and load ``weights``; returns it in eval mode.

    ``weights``: None (random init); a source's named weights (torchvision enum names such as
    ``"DEFAULT"`` / ``"IMAGENET1K_V1"``; ``"DEFAULT"`` for timm, cifar and fmnist; these
    download except fmnist's packaged file); a local .pth/.pt/.th/.safetensors file; or, for
    a torchvision model, a TensorFlow Lite ``.tflite`` file of the same network
    (:mod:`compresscnn.io.models.tflite_weights`: TF's padding, its 1001-class head, its input
    range in ``pretrained_cfg``).
    The model carries ``model.pretrained_cfg`` (see the module docstring).
    """
    source, name = parse_spec(spec)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ModelError(f"weights for {spec} must be a string or null, got {type(weights).__name__}")
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if is_tflite_path(weights) and source != "torchvision":
        raise ModelError(f"TFLite weights ({weights}) are read into torchvision models only "
                         f"(e.g. 'torchvision:mobilenet_v2'), not {spec}")
    model, cfg = _BUILDERS[source](name, weights)
    model.pretrained_cfg = cfg
    return model.eval()


def load_architecture(spec: str, weights: str | None = None) -> nn.Module:
    """The model :func:`load_model` builds for ``(spec, weights)``, with random weights:
    nothing is read or downloaded. Weights may shape the architecture: a ``.tflite`` file's
    TF 'SAME' padding puts a ``ZeroPad2d`` before its stride-2 convs
    (:func:`~compresscnn.io.models.tflite_weights.tf_same_padding`, at the model's input size)."""
    model = load_model(spec, None)
    if is_tflite_path(weights):
        if parse_spec(spec)[0] != "torchvision":
            raise ModelError(f"TFLite weights ({weights}) are read into torchvision models "
                             f"only (e.g. 'torchvision:mobilenet_v2'), not {spec}")
        size = tuple(model.pretrained_cfg["input_size"])
        tf_same_padding(model, size, spec=spec)  # type: ignore[arg-type]
        model.pretrained_cfg = {**model.pretrained_cfg, "weights": str(weights)}
    return model.eval()


def replace_head(model: nn.Module, num_classes: int, *, seed: int = 0) -> str | None:
    """Give ``model`` a new, randomly initialised (seeded) classifier with ``num_classes``
    outputs when it has another number; returns the replaced layer's name (None: nothing to
    do). The head is timm's ``reset_classifier`` where there is one, else the last Linear or
    Conv2d whose outputs are the model's classes (``fc``, ``classifier.6``, SqueezeNet's
    ``classifier.1``), rebuilt with the same geometry."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    old = int(cfg.get("num_classes") or 0)
    if int(num_classes) == old:
        return None
    spec = cfg.get("spec") or type(model).__name__
    heads = [(n, m) for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == old)
             or (isinstance(m, nn.Conv2d) and m.out_channels == old and m.groups == 1)]
    if not heads and not hasattr(model, "reset_classifier"):
        raise ModelError(f"model.num_classes: cannot find the classifier of {spec} (no Linear "
                         f"or Conv2d with its {old} outputs)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(int(num_classes))
            name = "reset_classifier"
        else:
            name, layer = heads[-1]
            model.set_submodule(name, _new_head(layer, int(num_classes)))
    if hasattr(model, "num_classes"):
        model.num_classes = int(num_classes)
    model.pretrained_cfg = {**cfg, "num_classes": int(num_classes),
                            "head_replaced": {"layer": name, "from": old, "to": int(num_classes)}}
    return name


def _new_head(layer: nn.Module, n: int) -> nn.Module:
    p = next(layer.parameters())
    kw = {"bias": layer.bias is not None, "device": p.device, "dtype": p.dtype}
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, n, **kw)
    return nn.Conv2d(layer.in_channels, n, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation,
                     padding_mode=layer.padding_mode, **kw)
