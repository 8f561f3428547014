"""The settings of the data-aware fit (:mod:`compresscnn.fit.calibration`), declared once.

:class:`FitConfig` is what :func:`compresscnn.core.surgery.refine` and ``compress`` read (the
layer-wise fit, BatchNorm re-estimation, label-free distillation);
:class:`CalibrationDistill` is what :func:`compresscnn.fit.calibration.distill_outputs` reads.
A recipe's ``calibration`` section is :class:`Calibration`: the calibration batches plus a
:class:`FitConfig`. No torch here: recipes are checked before torch is loaded.
"""

from typing import Optional

from pydantic import model_validator

from compresscnn.config import FRACTION, SOLVERS, Bool, Closed, Enum, Float, Int, bad, doc

__all__ = ["FIT_THROUGH", "SOLVERS", "MIXES", "CalibrationDistill", "FitConfig",
           "CalibrationBatches", "Calibration"]

#: what data-aware reconstruction matches (``calibration.following_ops``)
FIT_THROUGH: tuple[str, ...] = ("layer", "bn", "activation")
#: how calibration distillation mixes its images (``compresscnn.util.augment.mix_batch``)
MIXES: tuple[str, ...] = ("none", "mixup", "cutmix")


class CalibrationDistill(Closed):
    """After the layer-wise fit, train the whole compressed model to reproduce the original
    model's outputs on the calibration batches: knowledge distillation without labels
    (Adam, cosine decay, BatchNorm statistics kept). Each pass costs about three forward
    passes of the compressed model and one of the original per batch. null or absent: off."""

    epochs: Int(1) = doc("Passes over the calibration batches.", 4)
    lr: Float(0.0, lo_open=True) = doc("Adam learning rate at the start (cosine to 0).", 1e-3)
    temperature: Float(0.0, lo_open=True) = doc("Softmax temperature of the KL loss.", 1.0)
    flip: Bool = doc("Mirror each batch left-right with probability 1/2 (the original's "
                     "outputs on the mirrored images are computed too).", True)
    mix: Enum(*MIXES) = doc(
        "Mix each batch within itself at every step (`mixup`: blended pairs; `cutmix`: a box "
        "of another image pasted in), the original's outputs on the mixed images as the "
        "targets: new inputs at every step, for when the calibration images are few (e.g. "
        "one per class). Costs one more forward pass of the original per step.", "none")
    mix_alpha: Float(0.0, lo_open=True) = doc(
        "Beta(alpha, alpha) distribution of the mixing weight.", 1.0)
    features: Float(0.0) = doc(
        "Weight of a layer-wise term added to the KL loss: each replaced layer's output "
        "error relative to the original layer's output on the same images, averaged over the "
        "layers (many more targets per image than the logits). 0: logits only. Costs one "
        "forward pass of the original per step.", 0.0)
    amp: Enum("auto", "off", "bf16", aliases={False: "off"}) = doc(
        "Precision of the compressed model's forward pass while it is distilled (the "
        "original's targets are float32): `auto`: bf16 autocast on CPUs that compute bf16 in "
        "hardware, float32 elsewhere; `off`: float32, for a fit already so close that bf16's "
        "rounding is of the size of what is left to learn.", "auto")
    holdout: Int(0) = doc(
        "Calibration batches (the last ones of the seeded random order) kept out of the "
        "layer-wise fit and the distillation, to score the distillation: after every pass the "
        "KL divergence on them is measured, and the weights of the pass where it was lowest "
        "are kept (pass 0: the layer-wise fit alone, so a distillation that does not "
        "generalise beyond its images is undone). 0: every batch fits and trains, the last "
        "pass's weights are kept.", 0)
    crop: FRACTION = doc(
        "Crop every image to its own random box of area fraction between this and 1 (aspect "
        "ratio 3/4 to 4/3, anywhere in the image) resized back to the batch's size, the "
        "original's outputs on the crops as the targets: Inception-style crops on the "
        "preprocessed calibration tensors, more of the original's function to match when "
        "the images are few. Costs one more forward pass of the original per step. 1: no "
        "cropping.", 1.0)
    warmup: Float(0.0, 1.0, hi_open=True) = doc(
        "Fraction of the steps over which the learning rate rises linearly from 0 to `lr` "
        "before the cosine decay, so that Adam's first, poorly estimated steps do not undo "
        "the layer-wise fit.", 0.0)


class FitConfig(Closed):
    """What the data-aware fit does with the calibration batches (:func:`compresscnn.core.
    surgery.refine`): the layer-wise fit, BatchNorm re-estimation and label-free
    distillation."""

    reconstruct: Bool = doc(
        "Fit each replacement to the original layer's output on the compressed model's own "
        "input (asymmetric response reconstruction, Zhang et al. 2015), layer by layer.", True)
    solver: Enum(*SOLVERS) = doc(
        "How `reconstruct` fits a layer. `closed_form`: from the second moments of the layer's "
        "input patches, accumulated in one pass: the last factor of each decomposition (a "
        "dense layer or an SVD pair as a whole) by least squares, then all its factors jointly "
        "on the same quadratic form (L-BFGS, no further passes over the data), and where a "
        "ReLU follows, Zhang et al. 2015's alternation on a sample of positions; each stops "
        "once its loss changes by less than 0.1%. `adam`: `steps` Adam steps per layer on all "
        "its factors, one batch per step (the earlier fit). Fire modules use `adam` either "
        "way.", "closed_form")
    steps: Int(1) = doc("Adam steps per layer for `reconstruct` with `solver: adam`.", 300)
    lr: Float(0.0, lo_open=True) = doc(
        "Adam learning rate for `reconstruct` with `solver: adam`.", 3e-3)
    fit_through: Enum(*FIT_THROUGH) = doc(
        "What `reconstruct` matches: `layer`: the layer's own output; `bn`: the output after "
        "the BatchNorm that alone consumes it; `activation`: after that BatchNorm and/or ReLU "
        "(Zhang et al. 2015's nonlinear reconstruction). Found on a torch.fx trace; a layer "
        "followed by anything else is fitted on its own output.", "activation")
    refit_dense: Bool = doc(
        "Also fit the Conv/Linear layers left dense that run after a replaced one (same "
        "objective, in execution order): they see the compressed model's inputs and absorb "
        "part of the error.", False)
    bn_recalibrate: Bool = doc(
        "Re-estimate BatchNorm running statistics on the calibration batches after the layers "
        "are replaced. Off by default: after `reconstruct` the layers already reproduce the "
        "outputs the original statistics were estimated on, and re-estimating them from a few "
        "batches cost ResNet-20 1.7 points (BENCHMARKS.md); useful with `reconstruct: false`.",
        False)
    distill: Optional[CalibrationDistill] = doc(CalibrationDistill.__doc__, None)


class CalibrationBatches(Closed):
    """How many calibration batches a run reads, and their size."""

    batches: Int(1) = doc("Number of calibration batches.", 8)
    batch_size: Int(1) = doc("Calibration batch size.", 64)


class Calibration(FitConfig, CalibrationBatches):
    """Data-aware decomposition: calibration batches from the `data.calibration` source (no
    augmentation) on which each replaced layer is fitted to the original layer's output
    (and, optionally, BatchNorm statistics are re-estimated). null or absent: off
    (data-free); `{}`: on with the defaults."""

    @model_validator(mode="after")
    def _holdout(self) -> "Calibration":
        if self.distill is not None and self.distill.holdout >= self.batches:
            raise bad(f"holdout {self.distill.holdout} leaves none of the {self.batches} "
                      "calibration batches to fit and distil on", ("distill", "holdout"))
        return self

