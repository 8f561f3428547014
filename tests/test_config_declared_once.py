"""Every setting has one declaration: the config models the recipe composes agree with each
other and with the code that reads them.

- A key that two models share with the same text is one setting: the same type and default
  (a subclass may start a setting elsewhere, ``train.lr``, but not change its type).
- The stage entry points' keyword defaults are the config's defaults.
- A constant (a tuple of names, a dict of defaults) is declared once: no module holds its
  own equal copy of another module's, and a dict of a section's keys holds its defaults.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest
from pydantic import BaseModel

from compresscnn.config import Closed, section_of, spec_of
from compresscnn.core.rules import CompressConfig, PlanConfig, RuleBase, Target
from compresscnn.fit.config import CalibrationDistill, FitConfig
from compresscnn.io.export_config import OnnxSettings
from compresscnn.measure.latency_config import LatencyConfig
from compresscnn.recipe.schema import Recipe
from compresscnn.train.config import Distill, Switch, Train, TrainConfig


def _models() -> list[type[Closed]]:
    """Every section model the recipe composes, and the stage configs the API takes."""
    seen: list[type[Closed]] = []
    queue: list[type[Closed]] = [Recipe, RuleBase, Target, PlanConfig, CompressConfig,
                                 FitConfig, TrainConfig, LatencyConfig, OnnxSettings]
    while queue:
        m = queue.pop(0)
        if m in seen:
            continue
        seen.append(m)
        for f in m.model_fields.values():
            sub = section_of(f.annotation)
            if sub is not None:
                queue.append(sub)
    return seen


def _type(f: Any) -> str:
    spec = spec_of(f.annotation, f.metadata)
    return spec.expected if spec is not None else repr(f.annotation)


def _default(f: Any) -> Any:
    return f.get_default(call_default_factory=True)


#: (model, key) pairs whose text says the same about another setting: export.quantize's
#: calibration batches are its own (32 images suit an int8 calibration), not `calibration`'s;
#: each data source is made by one factory (``config._source_model``) with its own split
DISTINCT = {("Quantize", "batch_size"), ("EvalSource", "split")}


def _declarations() -> dict[tuple[str, str], list[tuple[type, Any]]]:
    """(key, text) -> the models that declare it, with the field."""
    out: dict[tuple[str, str], list[tuple[type, Any]]] = {}
    for m in _models():
        for key, f in m.model_fields.items():
            if (m.__name__, key) not in DISTINCT:
                out.setdefault((key, f.description or ""), []).append((m, f))
    return out


def test_the_walk_covers_every_stage_section():
    names = {m.__name__ for m in _models()}
    assert {"Recipe", "Finetune", "Train", "Distill", "Switch", "Calibration",
            "CalibrationDistill", "Latency", "Export", "PlanConfig", "CompressConfig",
            "FitConfig", "TrainConfig", "LatencyConfig", "OnnxSettings"} <= names


@pytest.mark.parametrize("decl", sorted(_declarations().items(), key=lambda kv: kv[0]),
                         ids=lambda kv: kv[0][0])
def test_a_key_shared_by_models_is_one_setting(decl):
    """Same key and text in two models: the same type, and the same default unless one
    model is a subclass that starts the setting elsewhere."""
    (key, _), where = decl
    (m0, f0), rest = where[0], where[1:]
    for m, f in rest:
        assert _type(f) == _type(f0), f"{m.__name__}.{key} and {m0.__name__}.{key} differ in type"
        related = issubclass(m, m0) or issubclass(m0, m)
        if not related:
            assert _default(f) == _default(f0), (
                f"{m.__name__}.{key} = {_default(f)!r} but {m0.__name__}.{key} = "
                f"{_default(f0)!r}: one setting, declared twice")


def test_a_subclass_keeps_the_type_of_what_it_overrides():
    for m in _models():
        for base in m.__mro__[1:]:
            if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
                for key, f in base.model_fields.items():
                    if key in m.model_fields:
                        assert _type(m.model_fields[key]) == _type(f), f"{m.__name__}.{key}"


def _kw_defaults(fn: Any) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _entry_points() -> list[tuple[str, Any, type[BaseModel]]]:
    from compresscnn.fit.calibration import reconstruct_outputs
    from compresscnn.train.cuttlefish import StableRankMonitor
    from compresscnn.train.loop import distillation_loss
    return [("distillation_loss", distillation_loss, Distill),
            ("reconstruct_outputs", reconstruct_outputs, FitConfig),
            ("StableRankMonitor", StableRankMonitor.__init__, Switch)]


def _config_entry_points() -> list[tuple[str, Any, type[BaseModel]]]:
    from compresscnn.fit.calibration import distill_outputs
    from compresscnn.train.loop import finetune
    return [("finetune", finetune, TrainConfig),
            ("distill_outputs", distill_outputs, CalibrationDistill)]


@pytest.mark.parametrize("name,fn,model", _config_entry_points(), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_entry_points_take_their_config_whole(name, fn, model):
    """An entry point that reads a stage's config takes it as one ``config`` argument (the
    model, a mapping that validates into it, or None for its defaults): none of its other
    keywords repeats a key of the config, so its defaults are the config's alone; and it
    has at most 8 parameters."""
    params = inspect.signature(fn).parameters
    assert "config" in params and params["config"].default is None, name
    assert model.__name__ in str(params["config"].annotation), name
    repeated = sorted(set(params) & set(model.model_fields))
    assert not repeated, f"{name} repeats {model.__name__}'s keys {repeated} as keywords"
    assert len(params) <= 8, f"{name} has {len(params)} parameters"


def test_finetune_defaults_are_the_config_defaults():
    """``finetune(model, loader)`` with no config trains as a recipe's default ``finetune``
    section: the config it validates an empty mapping into is ``Finetune()``."""
    from compresscnn.train.config import Finetune
    from compresscnn.train.loop import _train_config
    assert _train_config(None) == Finetune() == _train_config({})
    assert _train_config(Finetune(lr=0.5)).lr == 0.5


@pytest.mark.parametrize("name,fn,model", _entry_points(), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_entry_point_defaults_are_the_config_defaults(name, fn, model):
    """A keyword of a stage's entry point named like a key of its config defaults to the
    config's default (else the Python API and a recipe would differ)."""
    fields = model.model_fields
    shared = {k: v for k, v in _kw_defaults(fn).items() if k in fields}
    assert shared, f"{name} shares no keyword with {model.__name__}"
    for k, v in shared.items():
        assert v == _default(fields[k]), (f"{name}({k}={v!r}) but {model.__name__}.{k} "
                                          f"defaults to {_default(fields[k])!r}")


def test_defaults_of_one_stage_equal_its_section():
    from compresscnn.train.loop import DEFAULT_DISTILL
    assert DEFAULT_DISTILL == Distill().model_dump()
    assert Train().model_dump().keys() >= TrainConfig().model_dump().keys()
    assert CalibrationDistill().holdout == 0


#: the modules that declare or read settings: the config language, the stage configs, and
#: the stages that read them
SETTINGS_MODULES = ("config", "core.rules", "core.surgery", "core.planning", "core.applying", "core.method_options",
                    "fit.config", "fit.calibration", "fit.response", "train.config",
                    "train.loop", "train.scratch", "train.cuttlefish", "train.engine",
                    "train.checkpoints", "recipe.schema", "runs.pipeline",
                    "measure.latency", "measure.latency_config", "io.export_config",
                    "recipe.sections", "util.common", "util.training")


def _modules() -> list[Any]:
    return [importlib.import_module(f"compresscnn.{m}") for m in SETTINGS_MODULES]


def test_no_constant_is_declared_twice():
    """No two modules hold equal, separately declared tuples of names (``INITS``,
    ``SOLVERS``...): one declares it, the others import it."""
    seen: dict[tuple, tuple[str, str, int]] = {}
    for mod in _modules():
        for name, value in vars(mod).items():
            if not (name.isupper() and isinstance(value, tuple) and len(value) >= 2
                    and all(isinstance(v, str) for v in value)):
                continue
            if value in seen and seen[value][2] != id(value):
                other = seen[value]
                pytest.fail(f"{mod.__name__}.{name} == {other[0]}.{other[1]} = {value}: "
                            "declared twice")
            seen.setdefault(value, (mod.__name__, name, id(value)))
