"""Batch-norm folding on a GPU (models/inference.py ``fold_batchnorm``, which core/runner.py calls on the
model's device): cuDNN computes fp32 convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``), which
rounds both models far more than folding does, and the check then refused folding on every Ampere or later
GPU. No GPU here: a convolution rounds its inputs and weights to TF32 whenever torch's settings let cuDNN use
TF32 for it, as the GPU does, and folding must be kept; the settings must be strict fp32 inside the check and
as they were after it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.inference import ATOL, RTOL, fold_batchnorm


def _cudnn_conv_tf32() -> bool:
    """Whether cuDNN would run an fp32 convolution in TF32 now: torch's precision for (cuda, conv), "none"
    inherited from (cuda, all), then from the generic setting (ATen's ``Context::float32Precision``)."""
    b = torch.backends
    for p in (b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision):
        if p != "none":
            return p == "tf32"
    return False


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to nearest with TF32's 10 mantissa bits, as a tensor core reads it."""
    i = t.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.fixture
def gpu_like_convs(monkeypatch):
    """Every ``nn.Conv2d`` (the folded ones too) computes as cuDNN would under the current settings; the
    settings seen at each call are recorded."""
    real = nn.Conv2d._conv_forward
    seen = []

    def conv(self, x, w, b):
        tf32 = _cudnn_conv_tf32()
        seen.append((tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
        return real(self, _tf32(x), _tf32(w), b) if tf32 else real(self, x, w, b)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", conv)
    return seen


@pytest.fixture(scope="module")
def model_and_example():
    """dmm_cnn (ResNet-18 trunk) with batch-norm statistics calibrated on a batch, as a trained network's are
    (activations of order 1), and an input batch of its shape."""
    torch.manual_seed(0)
    model = models.create_model("dmm_cnn", depth=18)
    pre = model.preprocessing
    x = model.prepare(torch.randint(0, 256, (8, pre.channels, *pre.size), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of this batch
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x[:2]


def test_folding_is_kept_where_convolutions_run_in_tf32(model_and_example, gpu_like_convs):
    model, x = model_and_example
    assert _cudnn_conv_tf32(), "torch's default: cuDNN convolutions in TF32"
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.conv.fp32_precision,
              torch.backends.cuda.matmul.fp32_precision, torch.get_float32_matmul_precision())
    folded, names = fold_batchnorm(model, x)
    assert names == ["trunk"], "folding refused: the check compared TF32-rounded outputs"
    assert gpu_like_convs and not any(tf32 or legacy for tf32, legacy, _ in gpu_like_convs)
    assert {mm for _, _, mm in gpu_like_convs} == {"highest"}
    after = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cuda.matmul.fp32_precision, torch.get_float32_matmul_precision())
    assert after == before  # the process's settings are back: TF32 for the inference that follows
    # what the check used to see: the two models under TF32 differ beyond its tolerance, by rounding alone
    with torch.inference_mode():
        want, got = model(x), folded(x)
    assert not all(torch.allclose(want[k], got[k], rtol=RTOL, atol=ATOL) for k in want)


@pytest.mark.parametrize("setup", ["legacy", "new"])
def test_the_check_restores_the_callers_precision_settings(model_and_example, gpu_like_convs, setup):
    """Whichever API the caller set TF32 with, the settings after the check are those before it."""
    b = torch.backends
    model, x = model_and_example
    saved = (b.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
             [p.fp32_precision for p in (b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul, b.mkldnn.matmul)])
    try:
        if setup == "legacy":
            b.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        else:
            b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "tf32"
            b.cuda.matmul.fp32_precision = "tf32"
        state = lambda: ([p.fp32_precision for p in (b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul, b.mkldnn.matmul)],  # noqa: E731
                         _cudnn_conv_tf32())
        before = state()
        legacy_before = (b.cudnn.allow_tf32, torch.get_float32_matmul_precision()) if setup == "legacy" else None
        _, names = fold_batchnorm(model, x)
        assert names == ["trunk"]
        assert not any(tf32 for tf32, _, _ in gpu_like_convs)
        assert state() == before and before[1]
        if legacy_before is not None:
            assert (b.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == legacy_before == (True, "high")
    finally:
        b.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])
        for p, v in zip((b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul, b.mkldnn.matmul), saved[2]):
            p.fp32_precision = v
