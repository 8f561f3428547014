"""The recipe's sections that the run itself reads (:mod:`compresscnn.runs.pipeline`), with
no stage module of their own: the model to load, what is evaluated, and the report. The
other sections are declared beside the code that reads them (``latency`` in
:mod:`compresscnn.measure.latency_config`, ``export`` in :mod:`compresscnn.io.export_config`,
``data`` in :mod:`compresscnn.io.data.config`, ``calibration`` in :mod:`compresscnn.fit.config`,
``finetune`` and ``train`` in :mod:`compresscnn.train.config`). No torch.
"""

from compresscnn.config import (Bool, Closed, Enum, Int, ListOf, ModelSpec, Nullable, Weights,
                                doc)

__all__ = ["ModelSection", "Evaluate", "Report"]


class ModelSection(Closed):
    """The pretrained model to compress."""

    spec: ModelSpec = doc("Which model: `<source>:<name>`.")
    weights: Nullable(Weights) = doc(
        "Pretrained weights: an enum name such as `DEFAULT` or `IMAGENET1K_V2` (the source's "
        "published weights), or a path to a weights file (a *path*). null: random "
        "initialisation (no weights; what a `train` job starts from).", None)
    input_size: Nullable(ListOf(Int(1), length=3, what="[C, H, W], three ints > 0")) = doc(
        "`[C, H, W]` of one input; null: from the model's `pretrained_cfg` / dataset. The data "
        "is fed at this size.", None)
    num_classes: Nullable(Int(1)) = doc(
        "Replace the model's classifier head by a new, randomly initialised one with this many "
        "classes when the model has another number (e.g. 10 to fine-tune an ImageNet model on "
        "CIFAR-10; then `finetune.distill.enabled: false`, as the original's new head is "
        "untrained). A model whose classes differ from the data's is refused without it.", None)


class Evaluate(Closed):
    """Accuracy (and agreement with the original model) on the test split. Evaluation is on
    when `baseline` or `zero_shot` is true; the fine-tuned model is evaluated whenever it is
    fine-tuned."""

    baseline: Bool = doc("Evaluate the original model.", True)
    zero_shot: Bool = doc("Evaluate right after decomposition, before fine-tuning.", True)
    max_batches: Nullable(Int(1)) = doc("Evaluate on at most this many batches.", None)


class Report(Closed):
    """report.json / report.md / plots."""

    latency: Bool = doc("Measure latency in each of `runtimes`.", True)
    runtimes: ListOf(Enum("torch", "onnxruntime", "openvino"), min_len=1) = doc(
        "Runtimes to time the original and compressed models in (fp32 and, with "
        "`export.quantize`, int8), all models of one runtime and batch timed against each "
        "other, interleaved: PyTorch eager, and the ONNX files in onnxruntime and OpenVINO "
        "(CPU; `openvino` needs the `runtimes` extra: `pip install 'compresscnn[runtimes]'`).",
        ["torch", "onnxruntime"])
    latency_batch: ListOf(Int(1), min_len=1) = doc("Batch sizes to time.", [1, 8])
    threads: Int(1) = doc("CPU threads while timing.", 1)
    plots: Bool = doc("Write plots (matplotlib).", True)
