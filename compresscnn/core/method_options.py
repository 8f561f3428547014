"""The decomposition methods as data: names, rank components and options, without torch.

A recipe names its methods and writes their options flat in each rule; checking that needs
the methods' names, rank components and option models, not their numerics. They are
declared here, importable without torch, so that ``compresscnn run`` refuses a misspelled
method or option in a fraction of a second, before torch and the model are loaded. Each
built-in decomposer (:mod:`compresscnn.core.decomposers`) takes its ``Options`` from here, and
:func:`~compresscnn.core.decomposers.register_decomposer` declares every registered method
(:func:`declare`), so that a method registered from Python is validated the same way; the
built-ins must match what is declared here (a mismatch is an error when the decomposers are
imported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import model_validator

from compresscnn.config import Bool, Enum, Float, Int, ListOf, MethodOptions, Nullable, bad, doc

__all__ = ["MethodInfo", "declare", "methods", "AUTO_CHOICES", "Tucker2Options", "CPOptions",
           "SVDOptions", "FireOptions", "AutoOptions"]


class Tucker2Options(MethodOptions):
    """Tucker-2 options."""

    hooi: Int(0) = doc("At most this many HOOI sweeps from the HOSVD; 0: HOSVD only.", 0)


class CPOptions(MethodOptions):
    """CP-ALS options."""

    iters: Int(1) = doc("ALS sweeps (at most; a rejected extrapolation counts as one).", 50)
    tol: Float(0.0) = doc("Relative change of the fit below which ALS stops.", 1e-6)
    ridge: Float(0.0) = doc("Tikhonov weight on the unit-norm least-squares problems.",
                            1e-4)
    max_norm_ratio: Float(0.0, lo_open=True) = doc(
        "Degeneracy bound: a fit whose terms' norm exceeds this multiple of the layer's is "
        "refitted with a larger ridge.", 2.0)
    seed: Int(0) = doc("Seed of the initialisation's random fill.", 0)
    extrapolate: Bool = doc(
        "Line-search acceleration of the sweeps (Bro 1998): 50 sweeps reach a lower "
        "error than 100 plain ones on resnet18's 3x3 convs.", True)
    precision: Enum("auto", "float64", "float32", "bfloat16") = doc(
        "Arithmetic of the ALS sweeps. `auto`: float32 for large problems (kernel size x "
        "rank >= 1e8, e.g. 256x256x3x3 at rank 432: 1.7x faster, relative error equal to "
        "4 decimals on resnet18's layers), with the two large products of each sweep in "
        "bfloat16 where the CPU multiplies it natively (AMX, AVX512-BF16), float64 below. "
        "`bfloat16`: float32 sweeps with bfloat16 products everywhere.", "auto")


class SVDOptions(MethodOptions):
    """Truncated SVD options."""

    randomized: Nullable(Bool) = doc(
        "Use the randomized range finder; null: the Gram matrix's eigendecomposition when "
        "the matrix is large (smaller side > 1024) and the rank truncated, the exact SVD "
        "otherwise; false: the exact SVD always.", None)
    power_iters: Nullable(Int(0)) = doc("Power iterations of the randomized path; null: "
                                        "10.", None)
    oversample: Nullable(Int(0)) = doc("Oversampling of the randomized path; null: "
                                       "max(20, rank / 2).", None)


class FireOptions(MethodOptions):
    """Fire module options."""

    squeeze_ratio: Nullable(Float(0.0, lo_open=True)) = doc(
        "Caps the squeeze channels at ceil(squeeze_ratio * C_out); null: no cap.", None)
    pct3x3: Float(0.0, 1.0) = doc("Share of the expand channels in the 3x3 branch.", 0.5)
    relu: Bool = doc("A ReLU after the squeeze conv (as in SqueezeNet; not exact).", False)


#: the methods ``auto`` may choose among (fire changes the block's structure, not a rank)
AUTO_CHOICES = ("cp", "spatial", "tucker2", "svd")


class AutoOptions(MethodOptions):
    """Mixed methods: the candidates the planner measures per layer."""

    methods: ListOf(Enum(*AUTO_CHOICES), min_len=1) = doc(
        "The methods to choose among per layer (each with its default options).",
        list(AUTO_CHOICES))
    ranks: Int(2) = doc(
        "Candidates per method and layer, evenly spread in MACs; each is decomposed to "
        "measure its error.", 12)

    @model_validator(mode="after")
    def _policies(self) -> "AutoOptions":
        # as a rule (the rule model inherits these options): a rank or energy is per method
        for key in ("rank", "energy"):
            if getattr(self, key, None) is not None:
                raise bad(f"method auto takes a global target or a macs/params policy, "
                          f"not {key} (a {key} means something else for each method)",
                          (key,))
        return self


@dataclass(frozen=True)
class MethodInfo:
    """What a recipe needs to know of a method: the attributes of a
    :class:`~compresscnn.core.decomposers.Decomposer` that validation reads."""

    name: str
    #: names of the rank components, in order (``()``: the method chooses per layer)
    rank_names: tuple[str, ...]
    #: the options the method takes besides its rank
    Options: type[MethodOptions] = MethodOptions
    #: True for a method that picks other methods per layer while planning (``auto``)
    chooses: bool = False


_BUILTIN: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("auto", (), AutoOptions, chooses=True),
    MethodInfo("cp", ("r",), CPOptions),
    MethodInfo("fire", ("s",), FireOptions),
    MethodInfo("spatial", ("r",)),
    MethodInfo("svd", ("r",), SVDOptions),
    MethodInfo("tucker2", ("r_in", "r_out"), Tucker2Options),
)}

_METHODS: dict[str, MethodInfo] = dict(_BUILTIN)


def declare(name: str, rank_names: tuple[str, ...], options: type[MethodOptions],
            chooses: bool = False) -> None:
    """Declare a registered method (called by ``register_decomposer``). A built-in must
    match its declaration here: a ``ValueError`` names what differs."""
    info = MethodInfo(name, tuple(rank_names), options, bool(chooses))
    known = _BUILTIN.get(name)
    if known is not None and known != info:
        raise ValueError(f"decomposer {name!r} does not match its declaration in "
                         f"compresscnn.core.method_options: {info} != {known}")
    _METHODS[name] = info


def forget(name: str) -> None:
    """Remove a method declared from Python (the built-ins stay)."""
    if name not in _BUILTIN:
        _METHODS.pop(name, None)


def methods() -> Mapping[str, Any]:
    """Every method a recipe may name, by name (the built-ins, and those registered from
    Python so far)."""
    return _METHODS
