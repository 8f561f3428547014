"""How latency-aware planning times layers, declared once and without torch.

:class:`LatencyConfig` holds every setting :mod:`compresscnn.measure.latency` reads (the
runtime, threads, batch, the interleaved rounds, the margin a candidate must win by, the
rank multiple, the precision of the timed files) and the test hook ``timer``, which is no
setting and never leaves the process. The recipe's ``latency:`` section, :class:`Latency`,
holds the keys a recipe sets, each one :class:`LatencyConfig`'s own declaration
(:func:`~compresscnn.config.same_field`); the others are the planner's, set by the code
that plans (``precision: int8`` when the model will ship as a static int8 file).
"""

from typing import Any, Callable, Optional

from pydantic import Field, ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema

from compresscnn.config import (Closed, Enum, Float, Int, Nullable, doc, field_type, first_error,
                                fmt_path, one_line, same_field)
from compresscnn.errors import RecipeError

__all__ = ["LatencyConfig", "Latency", "ROUND_TO", "preferred_round_to"]

#: the rank multiple each runtime rewards when a rule gives no ``round_to``: onnxruntime's
#: CPU provider keeps a conv in its blocked NCHWc layout only when its input channels are a
#: multiple of 4 and pads them to its block (8 floats with AVX2, 16 with AVX-512); OpenVINO's
#: and oneDNN's (PyTorch's) blocked layouts are 8 or 16 channels wide too. Rounding to 8
#: keeps every conv blocked; 8 and 16 measured within the run-to-run spread of each other on
#: ResNet-18 and VGG-16 in onnxruntime, while 8 costs less rank (BENCHMARKS.md, "Channel
#: blocking"); unrounded ranks lost about a fifth of the speed-up.
ROUND_TO = {"onnxruntime": 8, "openvino": 8, "torch": 8, "torch_bf16": 8}


def preferred_round_to(runtime: str) -> int:
    """The rank multiple ``runtime`` rewards (:data:`ROUND_TO`)."""
    return ROUND_TO.get(runtime, 8)


class LatencyConfig(Closed):
    """How latency-aware planning (`objective: latency` rules, a `latency` target) times
    layers, and the runtime the result must not be slower on."""

    runtime: Enum("onnxruntime", "openvino", "torch", "torch_bf16") = doc(
        "Runtime to plan for: onnxruntime CPU, OpenVINO CPU (float32; the `runtimes` extra: "
        "`pip install 'compresscnn[runtimes]'`), PyTorch eager, or PyTorch CPU inference in "
        "bf16 autocast with channels_last (for CPUs that compute bf16 natively). Rules that "
        "give no `round_to` round ranks to the channel multiple this runtime rewards (8).",
        "onnxruntime")
    threads: Int(1) = doc("Intra-op threads while timing.", 1)
    batch: Int(1) = doc("Batch size the model will serve.", 1)
    warmup: Int(0) = doc("Untimed calls per candidate before the timed rounds.", 2)
    rounds: Int(1) = doc("Interleaved timing rounds per layer.", 5)
    per_round: Int(1) = doc("Timed calls per candidate in each round.", 3)
    margin: Float(0.0, 1.0, hi_open=True) = doc(
        "A candidate must be at least this fraction faster than the dense layer to be used.",
        0.03)
    max_candidates: Int(1) = doc("Candidate ranks timed per layer.", 8)
    round_to: Nullable(Int(1)) = doc(
        "Rank multiple of the rules that give none; null: the runtime's (`ROUND_TO`).", None)
    precision: Enum("fp32", "int8") = doc(
        "`int8`: time the ONNX runtimes' candidates as static int8 files (the model will be "
        "deployed quantized: `export.quantize`); `fp32`: as float32 files.", "fp32")
    #: test hook: ``timer(module, x) -> ms`` replaces the measurement (not a setting: no
    #: schema, not dumped, not described)
    timer: SkipJsonSchema[Optional[Callable[[Any, Any], float]]] = Field(None, exclude=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _error(e) from None

    @model_validator(mode="after")
    def _runtime_round_to(self) -> "LatencyConfig":
        if self.round_to is None:
            self.round_to = preferred_round_to(self.runtime)
        return self

    @classmethod
    def from_any(cls, v: "LatencyConfig | Closed | dict[str, Any] | None") -> "LatencyConfig":
        """``v`` as a :class:`LatencyConfig`: itself, the recipe's section, a mapping of
        its keys, or None (the defaults)."""
        if isinstance(v, LatencyConfig):
            return v
        if isinstance(v, Closed):
            v = v.model_dump()
        try:
            return cls.model_validate(dict(v or {}))
        except ValidationError as e:
            raise _error(e) from None

    def describe(self) -> dict[str, Any]:
        """Every setting, plain (what a plan's ``latency`` reports)."""
        return self.model_dump()


def _error(e: ValidationError) -> RecipeError:
    path, what = first_error(e, ("latency",))
    return RecipeError(one_line(f"{fmt_path(path)}: {what}"))


def _key(name: str) -> Any:
    return field_type(LatencyConfig, name)


class Latency(Closed):
    """How latency-aware planning (`objective: latency` rules, a `latency` target) times
    layers, and the runtime the result must not be slower on."""

    runtime: _key("runtime") = same_field(LatencyConfig, "runtime")
    threads: _key("threads") = same_field(LatencyConfig, "threads")
    batch: _key("batch") = same_field(LatencyConfig, "batch")
    rounds: _key("rounds") = same_field(LatencyConfig, "rounds")
    margin: _key("margin") = same_field(LatencyConfig, "margin")
    max_candidates: _key("max_candidates") = same_field(LatencyConfig, "max_candidates")
