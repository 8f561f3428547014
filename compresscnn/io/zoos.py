"""The model names each source offers, read without importing torch, torchvision or timm.

``compresscnn run`` checks a recipe's ``model.spec`` with :func:`check_spec` right after the
recipe itself, before torch is loaded (importing torchvision or timm alone takes seconds), so
that a misspelled model is refused at once. torchvision and timm register their models with
a decorator (``@register_model``); the names are read from the installed packages' source
files: what :func:`torchvision.models.list_models` (``module=torchvision.models``, the
classification zoo :func:`compresscnn.io.models.load_model` takes) and :func:`timm.is_model`
answer once imported (the tests compare the two). A name is refused only when it is in no
list *and* appears nowhere in the package's source text, so a registration this reader does
not recognise can never refuse a real model: that name is left to the loader.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from compresscnn.errors import ModelError

__all__ = ["known_names", "check_spec", "unknown_name", "IMAGENET_MEAN", "IMAGENET_STD"]

#: the ImageNet normalisation of torchvision's and most timm models (RGB, inputs in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``@register_model()`` / ``@register_model(name="x")`` (torchvision), then the function
_TV_REGISTER = re.compile(
    r"^@register_model\((?:\s*(?:name\s*=\s*)?[\"'](?P<name>[\w.]+)[\"']\s*)?\)\s*\n"
    r"(?:[ \t]*@[^\n]*\n)*[ \t]*def\s+(?P<fn>\w+)", re.M)
#: ``@register_model`` (timm), then the function
_TIMM_REGISTER = re.compile(r"^@register_model\s*\n(?:@[^\n]*\n)*def\s+(\w+)", re.M)
#: ``register_model_deprecations(__name__, {'old_name': 'new.tag', ...})`` (timm)
_TIMM_DEPRECATED = re.compile(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}\s*\)",
                              re.S)
_DICT_KEY = re.compile(r"[\"']([\w.-]+)[\"']\s*:")

#: the CIFAR and Fashion-MNIST nets of :mod:`compresscnn.io.models` (the tests compare them)
_OWN = {"cifar": ("resnet20", "resnet32", "resnet44", "resnet56", "alexnet", "squeezenet1_0",
                  "squeezenet1_1"),
        "fmnist": ("cnn",)}


def _package_dir(package: str, sub: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / sub
    return d if d.is_dir() else None


@lru_cache(maxsize=None)
def _sources(package: str, sub: str) -> tuple[str, ...]:
    """The text of ``package/sub/*.py`` (not the sub-folders: torchvision keeps its detection,
    segmentation, video and quantized models there)."""
    d = _package_dir(package, sub)
    if d is None:
        return ()
    out = []
    for f in sorted(d.glob("*.py")):
        try:
            out.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return tuple(out)


@lru_cache(maxsize=None)
def known_names(source: str) -> tuple[str, ...] | None:
    """The names ``source`` offers, sorted; None where they cannot be read without importing
    the package (not installed, or no registration recognised)."""
    if source in _OWN:
        return tuple(sorted(_OWN[source]))
    names: set[str] = set()
    if source == "torchvision":
        for text in _sources("torchvision", "models"):
            names.update(m["name"] or m["fn"] for m in _TV_REGISTER.finditer(text))
    elif source == "timm":
        for text in _sources("timm", "models"):
            names.update(_TIMM_REGISTER.findall(text))
            for block in _TIMM_DEPRECATED.findall(text):
                names.update(_DICT_KEY.findall(block))
    return tuple(sorted(names)) or None


def _mentioned(source: str, name: str) -> bool:
    """Whether ``name`` appears as a word anywhere in the source package's model files."""
    pkg = {"torchvision": "torchvision", "timm": "timm"}.get(source)
    if pkg is None:
        return False
    word = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w])")
    return any(word.search(text) for text in _sources(pkg, "models"))


def unknown_name(source: str, name: str, known: list[str] | tuple[str, ...]) -> ModelError:
    """The error for a name ``source`` does not have, with the closest known names."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if close:
        hint = "did you mean " + ", ".join(f"'{source}:{c}'" for c in close) + "?"
    elif len(known) <= 12:
        hint = "known: " + ", ".join(f"'{source}:{c}'" for c in known)
    else:
        hint = f"see compresscnn.io.models.model_names('{source}') for the {len(known)} known names"
    return ModelError(f"unknown {source} model {name!r}; {hint}")


def check_spec(spec: str) -> None:
    """Refuse (:class:`~compresscnn.errors.ModelError`) a ``source:name`` whose name the
    source surely does not have; anything this module cannot tell is left to the loader."""
    source, _, name = str(spec).partition(":")
    source, name = source.strip().lower(), name.strip()
    if source == "cifar":
        name = name.partition("?")[0].strip()  # hyperparameters: checked by the loader
    elif source == "timm":
        name = name.partition(".")[0]  # a pretrained tag (resnet50.a1_in1k)
    known = known_names(source)
    if not name or known is None or name in known or _mentioned(source, name):
        return
    raise unknown_name(source, name, known)
