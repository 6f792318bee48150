"""dlib's ``serialize`` format read in pure Python (no dlib, no C++): the reader behind
models/dlib_resnet.py, which gives it its network's layout (:func:`read_net`).

The file format (dlib's ``serialize``; ``dlib/serialize.h``, ``dlib/dnn/core.h``, ``layers.h``, ``input.h``,
``loss.h``, ``dlib/cuda/tensor.h``):

* integer: a control byte (low 4 bits: number of bytes, bit 0x80: negative) then the magnitude,
  little-endian; float/double: an integer mantissa and an int16 exponent (value = m · 2^e; exponents
  32000/32001/32002 are +inf/-inf/nan); bool: ASCII ``'1'``/``'0'``; string: length then bytes; tensor:
  version 2, four shape integers (n, k, nr, nc), raw little-endian float32; alias tensor: version 1 and a shape.
* ``add_loss_layer`` writes its version, the loss, then the net; every other wrapper (``add_layer``,
  ``add_tag_layer``, ``add_skip_layer``) writes its version, then the layer below, then (``add_layer`` only)
  its layer's settings and some training state. So the file opens with the wrappers' versions from the
  outermost inwards, then the input layer, then each layer's settings from the innermost outwards.
"""

from __future__ import annotations

import math

import numpy as np


class DlibFormatError(ValueError):
    """The file is not the network models/dlib_resnet.py rebuilds (wrong hash, truncated, unexpected layer)."""


# --- the serialize reader ----------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"file ends at byte {len(self.data)}, {n} more bytes wanted at {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte 0x{control:02x} at {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent == 32000:
            return math.inf
        if exponent == 32001:
            return -math.inf
        if exponent == 32002:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        c = bytes(self._take(1))
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"bad boolean {c!r} at {self.pos - 1}")
        return c == b"1"

    def string(self) -> str:
        n = self.int()
        return bytes(self._take(n)).decode("latin-1")

    def version(self, expected: tuple[int, ...], what: str) -> int:
        v = self.int()
        if v not in expected:
            raise DlibFormatError(f"{what}: version {v} at byte {self.pos}, expected one of {expected}")
        return v

    def tensor(self) -> np.ndarray:
        self.version((2,), "tensor")
        shape = tuple(self.int() for _ in range(4))
        n = int(np.prod(shape))
        return np.frombuffer(self._take(4 * n), dtype="<f4").reshape(shape).astype(np.float32)

    def alias(self) -> tuple[int, ...]:
        self.version((1,), "alias_tensor")
        return tuple(self.int() for _ in range(4))


def _read_layer(r: _Reader, kind: str) -> dict:
    name = r.string()
    if kind == "con":
        if name not in ("con_4", "con_5", "con_6"):
            raise DlibFormatError(f"expected a convolution, found {name!r}")
        params = r.tensor().reshape(-1)
        out = {"kind": kind, "num_filters": r.int(), "nr": r.int(), "nc": r.int(), "stride_y": r.int(),
               "stride_x": r.int(), "pad_y": r.int(), "pad_x": r.int()}
        filters, biases = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        use_bias = r.bool() if name in ("con_5", "con_6") else True
        if name == "con_6":
            r.bool()  # use_relu (fused relu): not used by this network
        nf = int(np.prod(filters))
        out["weight"] = params[:nf].reshape(filters)
        out["bias"] = params[nf : nf + int(np.prod(biases))] if use_bias and biases[0] else None
        return out
    if kind == "affine":
        if name not in ("affine_", "affine_2"):
            raise DlibFormatError(f"expected an affine layer, found {name!r}")
        params = r.tensor().reshape(-1)
        g, b = r.alias(), r.alias()
        r.int()  # mode (CONV_MODE)
        if name == "affine_2":
            r.bool()  # disabled
        k = int(np.prod(g))
        return {"kind": kind, "gamma": params[:k], "beta": params[k : k + int(np.prod(b))]}
    if kind in ("max_pool", "avg_pool"):
        if name != f"{kind}_2":
            raise DlibFormatError(f"expected {kind}_2, found {name!r}")
        return {"kind": kind, "nr": r.int(), "nc": r.int(), "stride_y": r.int(), "stride_x": r.int(),
                "pad_y": r.int(), "pad_x": r.int()}
    if kind == "relu":
        if name not in ("relu_", "relu_2"):
            raise DlibFormatError(f"expected relu, found {name!r}")
        if name == "relu_2":
            r.bool()
        return {"kind": kind}
    if kind == "add_prev":
        if name != "add_prev_":
            raise DlibFormatError(f"expected add_prev_, found {name!r}")
        return {"kind": kind}
    if kind == "fc":
        if name not in ("fc_2", "fc_3"):
            raise DlibFormatError(f"expected fc_, found {name!r}")
        n_out, n_in = r.int(), r.int()
        params = r.tensor().reshape(-1)
        r.alias(), r.alias()
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        if name == "fc_3":
            r.bool()
        if bias_mode != 1:  # FC_NO_BIAS
            raise DlibFormatError("expected fc_no_bias")
        return {"kind": kind, "weight": params[: n_in * n_out].reshape(n_in, n_out).T.copy()}
    raise AssertionError(kind)


def _skip_training_state(r: _Reader, input_layer: bool, version: int) -> None:
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
        r.bool()
    r.tensor(), r.tensor(), r.tensor()  # x_grad, cached_output, params_grad (grad_final for the input layer)
    if input_layer and version >= 3:
        r.int()  # _sample_expansion_factor


def read_net(data: bytes, architecture: list[tuple]) -> tuple[dict, list[dict]]:
    """A serialized dlib network (an ``add_loss_layer<loss_metric>`` over ``input_rgb_image_sized``) whose
    wrappers from the input outwards are ``architecture`` (``("layer", kind)``, ``("tag", id)``,
    ``("skip", id)``; models/dlib_resnet.py gives its network's) -> (input settings, layers from the input
    outwards)."""
    r = _Reader(data)
    r.version((1,), "add_loss_layer")
    loss = r.string()
    if loss != "loss_metric_2":
        raise DlibFormatError(f"expected loss_metric_2, found {loss!r}: not dlib's face-recognition network")
    r.float(), r.float()  # margin, distance threshold
    versions = []
    for i, (wrapper, _) in enumerate(reversed(architecture)):  # outermost first
        innermost = i == len(architecture) - 1
        if wrapper == "layer":
            versions.append(r.version((2, 3) if innermost else (1, 2), "add_layer"))
        else:
            r.version((1,), f"add_{wrapper}_layer")
            versions.append(None)
    versions.reverse()
    if r.string() != "input_rgb_image_sized":
        raise DlibFormatError("expected input_rgb_image_sized")
    means = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())
    layers = []
    for i, (wrapper, kind) in enumerate(architecture):
        if wrapper != "layer":
            continue
        layers.append(_read_layer(r, kind))
        _skip_training_state(r, input_layer=(i == 0), version=versions[i])
    if r.pos != len(r.data):
        raise DlibFormatError(f"{len(r.data) - r.pos} bytes left after the network")
    return {"means": means, "size": size}, layers
