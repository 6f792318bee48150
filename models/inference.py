"""Inference-only rewrite of a model: batch norm folded into the convolution before it.

In eval mode a ``BatchNorm2d`` after a ``Conv2d`` is an affine map of the convolution's output, so it can be
folded into the convolution's weight and bias (one kernel instead of two, one pass over the activations
fewer). ``torch.fx.experimental.optimization.fuse`` does this on a symbolically traced module. Measured on
this project's 2-core CPU (dmm_cnn, ResNet-50 trunk, batch 32, bf16 autocast, channels_last, variants
interleaved in one process, ``python bench/bench_inference.py``): 56.0 -> 61.3 images/s (+9 %).

The rewrite is applied to each direct child of the model (the trunk, the heads), not to the model itself,
so the model keeps its class and methods (``prepare``, ``decode``, the output description). A child that
cannot be traced (data-dependent control flow), or whose parent reaches inside it (``self.trunk.layer3``,
which the traced copy may no longer have), is left as it is: :func:`fold_batchnorm` checks, on a random
input in fp32 (strict: no TF32 on a GPU, :func:`strict_fp32`), that the folded model gives the original's
outputs, and returns the original otherwise.
Models with no batch norm (HMTNet's VGG-M) come back unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-3, 1e-3  # fp32 folding changes the rounding only: outputs agree to about 1e-5 relative


@contextlib.contextmanager
def strict_fp32():
    """fp32 convolutions and matmuls computed in fp32 inside the block, on every device: no TF32 in cuDNN
    (``torch.backends.cudnn.allow_tf32`` is True by default, so on an Ampere or later GPU a convolution rounds
    its inputs to 10 bits of mantissa: the folded and the original model then differed by up to about 4e-2, over
    the check's 1e-3, and folding was refused on every such GPU) nor in cuBLAS matmuls. Every setting is
    restored after, both the legacy flags and torch's ``fp32_precision`` ones: inside, the two agree, so that
    torch's check against mixing them (it raises when a kernel asks) passes whichever a kernel reads. The
    settings are the process's: nothing else may run torch work on another thread meanwhile (a model runner is
    built before its first batch)."""
    b = torch.backends
    precisions = (b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul, b.mkldnn.matmul)
    saved = [p.fp32_precision for p in precisions]
    try:
        cudnn_tf32 = b.cudnn.allow_tf32
    except RuntimeError:  # the legacy and new settings were mixed: the new ones are restored all the same
        cudnn_tf32 = saved[0] == "tf32"
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:
        matmul = None
    try:
        b.cudnn.allow_tf32 = False  # the legacy flag, and conv and rnn to "none"
        b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "ieee"  # not inherited from a parent
        torch.set_float32_matmul_precision("highest")  # legacy, and the cuda and mkldnn matmuls to "ieee"
        yield
    finally:
        b.cudnn.allow_tf32 = cudnn_tf32
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        for p, value in zip(precisions, saved):
            p.fp32_precision = value


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """``(model with conv+bn folded in each child where that is safe, names of the folded children)``.
    ``model`` must be in eval mode; it is not modified (the folded model is a copy). ``example`` is a
    float input batch of the model's shape, used to check the result."""
    from torch.fx.experimental.optimization import fuse

    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (training batch norm uses batch statistics)")
    if not _has_batchnorm(model):
        return model, []
    folded = copy.deepcopy(model)
    names = []
    for name, child in list(folded.named_children()):
        if not _has_batchnorm(child):
            continue
        try:
            setattr(folded, name, fuse(child, inplace=True))
            names.append(name)
        except Exception as e:  # noqa: BLE001 - fx tracing fails in many ways; the child stays eager
            log.debug("not folding %s: %s: %s", name, type(e).__name__, e)
    if not names:
        return model, []
    try:
        # in strict fp32: TF32 (a GPU's default for convolutions) rounds both models' activations far more than
        # folding does, and would hide the one difference this check is for
        with torch.inference_mode(), strict_fp32():
            want, got = model(example), folded(example)
        same = want.keys() == got.keys() and all(
            torch.allclose(want[k].float(), got[k].float(), rtol=RTOL, atol=ATOL) for k in want)
    except Exception as e:  # noqa: BLE001 - e.g. the parent reaches into a child that fx rebuilt
        log.info("batch-norm folding disabled: the folded model fails (%s: %s)", type(e).__name__, e)
        return model, []
    if not same:
        log.info("batch-norm folding disabled: the folded model's outputs differ from the original's")
        return model, []
    return folded, names
