"""The settings of the training loop (:func:`compresscnn.train.loop.finetune`), declared once.

:class:`TrainConfig` is what the loop reads; a recipe's ``finetune`` section is
:class:`Finetune` (the loop's settings, fine-tuning's defaults, and the distillation from the
original) and its ``train`` section :class:`Train` (the loop's settings, training's defaults,
and the factorized initialisation, regularizers and Cuttlefish switch of
:mod:`compresscnn.train.scratch`). No torch here: recipes are checked before torch is loaded.
"""

from typing import Optional

from compresscnn.config import (Bool, Closed, Enum, Float, Int, Nullable, doc, field_type,
                                same_field, section)
from compresscnn.util.common import SCHEDULES

__all__ = ["OPTIMIZERS", "MEMORY_FORMATS", "INITS", "SCHEDULES", "TrainConfig", "Distill",
           "Finetune", "Switch", "Train"]

#: optimizers and memory formats of the training loop
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
MEMORY_FORMATS: tuple[str, ...] = ("auto", "channels_last", "contiguous")
#: initialisations of factorized layers (:func:`compresscnn.train.scratch.factorize`)
INITS: tuple[str, ...] = ("kaiming", "spectral")


class TrainConfig(Closed):
    """The training loop's settings: what ``finetune`` and ``train`` share (one loop). The
    defaults are fine-tuning's; :class:`Train` starts from random weights with its own."""

    epochs: Int(0) = doc("Epochs over the training split.", 1)
    max_steps: Nullable(Int(1)) = doc("Stop after this many optimizer steps (short runs, "
        "tests).", None)
    optimizer: Enum(*OPTIMIZERS) = doc("Optimizer.", "sgd")
    lr: Float(0.0, lo_open=True) = doc(
        "Peak learning rate at `lr_batch` images per step; scaled linearly to "
        "the real (global) batch size.", 0.01)
    lr_batch: Int(1) = doc("The batch size `lr` is given for.", 128)
    factor_lr: Float(0.0, lo_open=True) = doc(
        "Multiplier of `lr` for the factors of the factorized layers (every chain of "
        "Conv2d or Linear factors the decomposers build); 1: one rate for the whole "
        "model. A factor chain moves its layer's kernel faster along the low-rank "
        "directions than SGD moves a dense kernel, so fitted factors may want a lower rate.",
        1.0)
    momentum: Float(0.0) = doc("SGD momentum (AdamW: beta1).", 0.9)
    weight_decay: Float(0.0) = doc("Weight decay (not on biases and norms).", 5.0e-4)
    schedule: Enum(*SCHEDULES) = doc(
        "Learning-rate schedule after warm-up (`onecycle`: linear up to the peak at 30% of "
        "the steps, then down to 0).", "cosine")
    warmup_steps: Int(0) = doc("Linear warm-up steps.", 0)
    label_smoothing: Float(0.0, 1.0) = doc("Label smoothing of the cross-entropy.", 0.0)
    mixup: Float(0.0) = doc("mixup Beta(a, a) parameter; 0: off.", 0.0)
    cutout: Int(0) = doc("Cutout square side in pixels; 0: off.", 0)
    clip_grad_norm: Nullable(Float(0.0, lo_open=True)) = doc(
        "Clip the gradients' global L2 norm to this; null: off.", None)
    keep: Enum("last", "best") = doc(
        "Weights to keep: `last`, or `best` by top-1 on `holdout` training images scored "
        "after every epoch (never on the test split).", "last")
    holdout: Int(0) = doc("Training images held out of training to score epochs (`keep: "
        "best`); 0: none.", 0)
    curve: Bool = doc(
        "Score top-1 on the evaluation source after every epoch: the learning curve, in the "
        "report's training statistics and a sweep's results file (it shows where training "
        "has flattened); never used to choose weights. Each point costs one evaluation "
        "pass; the training itself is the same with it or without.", False)
    device: Enum("auto", "cpu", "cuda") = doc("`auto`: CUDA when available, else CPU.",
        "auto")
    amp: Enum("auto", "off", "bf16", "fp16", aliases={False: "off"}) = doc(
        "Mixed precision; `auto`: bf16 on GPUs that support it and on CPUs that compute "
        "bf16 in hardware (AVX512-BF16 or AMX, as torch reports), fp16 on older GPUs, off "
        "elsewhere. YAML reads a bare `off` as false, which is accepted as `off`.", "auto")
    memory_format: Enum(*MEMORY_FORMATS) = doc(
        "`auto`: channels_last for conv nets.", "auto")
    compile: Bool = doc("Run the forward pass through `torch.compile`.", False)
    checkpoint_every: Nullable(Int(1)) = doc(
        "Also checkpoint every this many steps (a checkpoint is always written at the end "
        "of each epoch).", None)
    log_every: Int(1) = doc("Log the loss every this many steps.", 50)


class Distill(Closed):
    """Knowledge distillation from the original model."""

    enabled: Bool = doc("Distil from the uncompressed model.", True)
    temperature: Float(0.0, lo_open=True) = doc("Softmax temperature.", 4.0)
    alpha: Float(0.0, 1.0) = doc("Weight of the KD term; `1 - alpha` weighs cross-entropy.", 0.9)


class _Enabled(Closed):
    enabled: Bool = doc("Fine-tune after decomposition.", True)


class Finetune(TrainConfig, _Enabled):
    """Fine-tuning of the compressed model, distilled from the original."""

    distill: Distill = section()


class Switch(Closed):
    """Cuttlefish (Wang et al. 2023): train the model *dense*, measure the stable rank of
    every layer the `rules` take after each epoch, and once they have all settled (or at the
    end of `max_epochs`) factorize the trained weights at the scaled stable ranks and train
    the factorized model for the rest of `epochs`. The rules choose layers, methods and
    options; their rank policies and `target` are not used. The dense phase follows the
    schedule of the whole `epochs` budget up to the switch; the factorized phase restarts the
    schedule (warm-up included) over the remaining epochs, with the same optimizer settings.
    Needs `epochs` >= 2; not with `max_steps` or `init: spectral`. null or absent: off."""

    window: Int(2) = doc(
        "A layer has settled when the slope of its smoothed stable-rank trace, averaged over "
        "the last `window` epochs, is at most `tol` (never before `window` + 1 epochs).", 15)
    tol: Float(0.0, lo_open=True) = doc(
        "Largest mean slope (rank units per epoch) of a settled layer.", 0.1)
    max_epochs: Nullable(Int(1)) = doc(
        "Switch at the end of this epoch at the latest, settled or not (short budgets); "
        "null: `epochs` - 1.", None)
    min_fraction: Float(0.0, 1.0) = doc(
        "Lower bound of each rank as a fraction of the layer's full rank (Cuttlefish's "
        "ImageNet runs: 0.2).", 0.0)


class Train(TrainConfig):
    """Training from random initialisation instead of compressing pretrained weights
    (`model.weights` must be null). With `rules`, the matched layers are factorized *before*
    training (ranks from the rules / `target`, module structures of the decomposers);
    `rules: []` trains the dense model. null or absent: compress a pretrained model."""

    epochs: field_type(TrainConfig, "epochs") = same_field(TrainConfig, "epochs", 30)
    lr: field_type(TrainConfig, "lr") = same_field(TrainConfig, "lr", 0.1)
    init: Enum(*INITS) = doc(
        "Initialisation of factorized layers: `kaiming`: every factor Kaiming-normal, scaled "
        "so the chain's output variance matches a dense Kaiming layer; `spectral`: the best "
        "low-rank approximation of a dense Kaiming init (Khodak et al. 2021).", "kaiming")
    semi_orthogonal: Nullable(Int(1)) = doc(
        "Every this many steps, pull one factor of each factorized layer towards a scaled "
        "semi-orthogonal matrix (Povey et al. 2018); null: off.", None)
    frobenius_decay: Float(0.0) = doc(
        "Weight of the Frobenius norm of each factorized layer's product (Khodak et al. 2021) "
        "added to the loss; 0: off.", 0.0)
    switch: Optional[Switch] = doc(Switch.__doc__, None)
