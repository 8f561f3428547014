"""How a model is exported to ONNX and quantized, declared once and without torch.

:class:`OnnxSettings` is every setting :func:`compresscnn.io.export.export_onnx` reads (the
opset, the dynamic batch, the parity bound and the runtimes that check it, the batches and
seed of the check, BatchNorm folding). The recipe's ``export:`` section, :class:`Export`,
holds the keys a recipe sets, each one :class:`OnnxSettings`' own declaration
(:func:`~compresscnn.config.same_field`), plus ``onnx`` (export at all) and ``quantize``
(:class:`Quantize`, the int8 copy :func:`compresscnn.io.export.quantize_onnx` makes).
"""

from typing import Any, Optional

from pydantic import ValidationError

from compresscnn.config import (Bool, Closed, Enum, Float, Int, ListOf, Where, doc, field_type,
                                same_field)

__all__ = ["OnnxSettings", "Quantize", "Export", "onnx_settings"]


class OnnxSettings(Closed):
    """ONNX export of the compressed model."""

    opset: Int(18) = doc("ONNX opset (the dynamo exporter needs >= 18).", 18)
    dynamic_batch: Bool = doc("Make the batch dimension dynamic.", True)
    atol: Float(0.0, lo_open=True) = doc(
        "Largest allowed max-abs difference between onnxruntime and PyTorch outputs, times "
        "the largest |output| where that exceeds 1 (float32 rounding grows with the values).",
        1.0e-3)
    check_batch: ListOf(Int(1), min_len=1) = doc(
        "Batch sizes the file is checked at (with a static batch, the first only: the "
        "export batch).", [1, 3])
    seed: Int(0) = doc("Seed of the export example and of the check inputs.", 0)
    verify: ListOf(Enum("onnxruntime", "openvino", "opencv"), min_len=1) = doc(
        "Runtimes that run the exported file (CPU, float32) on the same random inputs as "
        "PyTorch; each must agree within `atol`, and each one's max abs difference goes into "
        "the report. onnxruntime always runs; `openvino` and `opencv` (OpenCV DNN) need the "
        "`runtimes` extra (`pip install 'compresscnn[runtimes]'`).", ["onnxruntime"])
    fold: Bool = doc("Fold BatchNorm (and Fire's channel reorder) into the convs before "
                     "export; the checks compare the file with the model as given.", True)
    strip: Bool = doc(
        "Drop what only debugging reads from the written file: each node's PyTorch stack "
        "trace and module scope (the dynamo exporter's node metadata) and the intermediate "
        "shapes (`value_info`, which runtimes infer again). Smaller files, the same graph "
        "and weights; the int8 copy inherits it.", True)


def onnx_settings(v: "OnnxSettings | Closed | dict[str, Any] | None") -> OnnxSettings:
    """``v`` as :class:`OnnxSettings`: itself, a mapping of its keys (or of a recipe's
    ``export`` section: its other keys are not the exporter's), or None (the defaults)."""
    if isinstance(v, OnnxSettings):
        return v
    if isinstance(v, Closed):
        v = v.model_dump()
    v = dict(v or {})
    if isinstance(v.get("verify"), str):
        v["verify"] = [v["verify"]]
    recipe_only = set(Export.model_fields) - set(OnnxSettings.model_fields)  # onnx, quantize
    where = Where("export_onnx()")
    try:
        return OnnxSettings.model_validate({k: x for k, x in v.items() if k not in recipe_only},
                                           context={"where": where})
    except ValidationError as e:
        raise where.error(e) from None


class Quantize(Closed):
    """An int8 copy of the exported file (`model.int8.onnx`, onnxruntime.quantization), scored
    like the fp32 one: its top-1 and agreement with the original model, its size and its
    latency in each of `report.runtimes` go into the report beside the fp32 file's. Before
    that it is compared with its fp32 source on the calibration images, and the run fails
    when they differ by more than `max_rel_error`. Calibration images come from the
    `data.calibration` source (by default the `train` one), never from the images accuracy
    is measured on (refused, whatever `data.allow_eval_overlap` says). null or absent: off."""

    mode: Enum("static", "dynamic") = doc(
        "`static`: QDQ format, weights int8 (per output channel with `per_channel`), "
        "activations uint8 with ranges calibrated (min-max) on the calibration images: what "
        "CPUs run as int8 convolutions (onnxruntime, OpenVINO). `dynamic`: weights int8, "
        "activations quantized at run time (no ranges to calibrate; fits Linear-heavy models; "
        "onnxruntime only).", "static")
    per_channel: Bool = doc("One weight scale per output channel (else per tensor).", True)
    batches: Int(1) = doc("Calibration batches (from `data.calibration`).", 8)
    batch_size: Int(1) = doc("Calibration batch size.", 32)
    max_rel_error: Float(0.0, lo_open=True) = doc(
        "Largest allowed ||int8 - fp32|| / ||fp32|| of the outputs of the two files on the "
        "calibration images; beyond it the run fails (nothing is written).", 0.35)


def _key(name: str) -> Any:
    return field_type(OnnxSettings, name)


class Export(Closed):
    """ONNX export of the compressed model."""

    onnx: Bool = doc("Export to ONNX and check it in onnxruntime.", True)
    opset: _key("opset") = same_field(OnnxSettings, "opset")
    dynamic_batch: _key("dynamic_batch") = same_field(OnnxSettings, "dynamic_batch")
    atol: _key("atol") = same_field(OnnxSettings, "atol")
    verify: _key("verify") = same_field(OnnxSettings, "verify")
    strip: _key("strip") = same_field(OnnxSettings, "strip")
    quantize: Optional[Quantize] = doc(Quantize.__doc__, None)
