"""Hostile checkpoints (audit of checkpoint loading): a file's hash is unkeyed, so anyone can edit a checkpoint
and re-sign it; what it costs to read one, and what it may ask of the code that uses it, is bounded before its
hash is trusted and before its model is built. Each test builds a small crafted file; a refusal that matters
because of a huge allocation is shown to come before it (a spy on the step that would allocate, or an
address-space limit on a subprocess)."""

from __future__ import annotations

import io
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import models
from models import checkpoint
from models.checkpoint import MAX_BYTES_ENV, CheckpointError, load_checkpoint, save_checkpoint
from models.checkpoint_hash import hash_of
from tests.helpers import save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hs(tmp_path_factory) -> str:
    return save_model(str(tmp_path_factory.mktemp("hostile") / "hs.pt"), "hard_sharing", seed=0)


def _tampered(src: str, dst: Path, edit, sign: bool = True) -> str:
    """``src`` edited by ``edit(obj)`` and re-signed with the public hash, as an attacker would."""
    obj = torch.load(src, weights_only=True)
    edit(obj)
    obj["hash"] = hash_of(obj) if sign else "sha256:" + "0" * 64
    torch.save(obj, dst)
    return str(dst)


def _spy(monkeypatch, owner, name: str) -> list:
    calls: list = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


# --- 1: the work before the hash and pin are checked is bounded by the file ---------------------------------

def test_a_deflated_archive_is_refused_before_torch_load(hs, tmp_path, monkeypatch):
    raw = io.BytesIO()
    torch.save({**torch.load(hs, weights_only=True), "state_dict": {"x": torch.zeros(5_000_000)}}, raw)
    zin = zipfile.ZipFile(io.BytesIO(raw.getvalue()))
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(tmp_path / "deflated.pt") < 100_000  # 20 MB of tensor in it
    loads = _spy(monkeypatch, torch, "load")
    with pytest.raises(CheckpointError, match="not stored whole in the file"):
        load_checkpoint(str(tmp_path / "deflated.pt"), max_bytes=1 << 20)
    assert not loads


def _overlapping(data: bytes, copies: int) -> bytes:
    """``data`` (a torch.save archive) with ``copies`` more central-directory records of its largest entry,
    all pointing at the same stored bytes: entries that together unpack to more than the file."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    infos = archive.infolist()
    big = max(infos, key=lambda i: i.file_size)
    records = []
    for k, info in enumerate(infos + [big] * copies):
        name = (info.filename if k < len(infos) else f"{big.filename}_{k}").encode()
        records.append(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, info.CRC,
                                   info.compress_size, info.file_size, len(name), 0, 0, 0, 0, 0,
                                   info.header_offset) + name)
    body, cd = data[:archive.start_dir], b"".join(records)
    return body + cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(records), len(records), len(cd), len(body), 0)


def test_archive_entries_that_overlap_cannot_count_one_region_twice(hs, tmp_path, monkeypatch):
    obj = {**torch.load(hs, weights_only=True), "state_dict": {"x": torch.ones(100_000)}}
    obj["hash"] = hash_of(obj)
    raw = io.BytesIO()
    torch.save(obj, raw)
    (tmp_path / "overlap.pt").write_bytes(_overlapping(raw.getvalue(), 3))
    loads = _spy(monkeypatch, torch, "load")
    with pytest.raises(CheckpointError, match="entries add up to"):
        load_checkpoint(str(tmp_path / "overlap.pt"))
    assert not loads


def test_a_view_over_a_small_storage_is_refused_before_hashing(hs, tmp_path, monkeypatch):
    path = _tampered(hs, tmp_path / "view.pt", lambda o: o["state_dict"].update(x=torch.zeros(1).expand(2000, 2000)))
    assert os.path.getsize(path) < os.path.getsize(hs) + 4096  # 16 MB of values from one stored float
    hashes = _spy(monkeypatch, checkpoint, "hash_of")
    with pytest.raises(CheckpointError, match=r"a view of shape \(2000, 2000\), strides \(0, 0\)"):
        load_checkpoint(path)
    assert not hashes


def test_the_audits_2kb_bomb_is_refused_within_1_gib_of_address_space(hs, tmp_path):
    """The audit's file: ``zeros(1).expand(30000, 30000)`` (3.6 GB once contiguous), behind a pin of another
    checkpoint. Before: a RuntimeError from the allocation escaped the loader. Run with 1 GiB of address space
    above what the process holds after importing torch."""
    obj = {**torch.load(hs, weights_only=True), "state_dict": {"x": torch.zeros(1).expand(30000, 30000)},
           "hash": "sha256:" + "0" * 64}
    torch.save(obj, tmp_path / "bomb.pt")
    assert os.path.getsize(tmp_path / "bomb.pt") < 4096
    code = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
from models.checkpoint import CheckpointError, load_checkpoint
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    load_checkpoint({str(tmp_path / "bomb.pt") + "#sha256:" + "ab" * 32!r})
except CheckpointError as e:
    print("CheckpointError:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "CheckpointError:" in out.stdout and "a view of shape" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("error", [RuntimeError, MemoryError, OverflowError])
def test_an_allocation_that_fails_while_hashing_is_a_checkpoint_error(hs, monkeypatch, error):
    def failing(obj):
        raise error("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(checkpoint, "hash_of", failing)
    with pytest.raises(CheckpointError, match="cannot be hashed"):
        load_checkpoint(hs)


def test_shared_references_cannot_multiply_the_hashing_work(hs, tmp_path):
    """A list of two references to a list of two ...: 2**21 values from a few KB, which the hash's JSON
    expands (2**30 from 2 KB took hours before). Refused by count, before hashing."""
    from models.checkpoint_hash import MAX_VALUES

    laugh: list = [0]
    for _ in range(21):
        laugh = [laugh, laugh]
    path = _tampered(hs, tmp_path / "laugh.pt", lambda o: o["extra"].update(laugh=laugh), sign=False)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"more than {MAX_VALUES} values"):
        load_checkpoint(path)
    assert time.perf_counter() - t0 < 5


# --- 5: what the hash cannot tell apart is refused (every existing hash unchanged) -----------------------------

@pytest.mark.parametrize("edit, why", [
    (lambda o: o["extra"].update(thresholds={1: 0.9}), "key 1"),  # hashed as {"1": 0.9}: one pin, two files
    (lambda o: o["extra"].update({True: 1}), "key True"),  # hashed as {"true": 1}
    (lambda o: o["extra"].update(k=b"ab"), "a bytes"),  # hashed as the text "b'ab'"
    (lambda o: o["extra"].update(k={1, 2}), "a set"),
    (lambda o: o["state_dict"].update({"a" + "torch.float32" + "(1,)": torch.ones(1)}), "hold no '\\('"),
], ids=["int-key", "bool-key", "bytes", "set", "state-dict-key-with-paren"])
def test_metadata_that_the_hash_would_confuse_is_refused(hs, tmp_path, edit, why):
    path = _tampered(hs, tmp_path / "odd.pt", edit)
    with pytest.raises(CheckpointError, match=why):
        load_checkpoint(f"{path}#{hash_of(torch.load(path, weights_only=True))}")


def test_genuine_checkpoints_are_stored_archives_and_load_bit_identically(tmp_path):
    """torch.save stores its entries (so the archive check passes every genuine file); a dlib-trunk model and
    hard_sharing load with the hash they were saved with and every tensor equal, bit for bit."""
    for name, kw in [("age_gender_race", {}), ("hard_sharing", {"hidden": 32})]:
        torch.manual_seed(1)
        m = models.create_model(name, **kw)
        path = str(tmp_path / f"{name}.pt")
        digest = save_checkpoint(m, path, metrics={"acc": 0.5}, extra={"run": "r1", "epochs": [1, 2]})
        assert {i.compress_type for i in zipfile.ZipFile(path).infolist()} == {zipfile.ZIP_STORED}
        m2, info = load_checkpoint(f"{path}#{digest}")
        assert info.hash == digest and m2.preprocessing == m.preprocessing
        sd, sd2 = m.state_dict(), m2.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)


# --- 2: the config builds nothing before it is known to fit -------------------------------------------------

def _meta_only(monkeypatch) -> list:
    """create_model made to refuse a real build: a test that passes shows the refusal came before allocating."""
    devices: list = []
    real = models.create_model

    def spy(name, **kw):
        devices.append(torch.empty(0).device.type)
        assert devices[-1] == "meta", "a real build of a model the file's config asks for"
        return real(name, **kw)

    monkeypatch.setattr(models, "create_model", spy)
    return devices


@pytest.mark.parametrize("keep_weights", [True, False], ids=["weights-kept", "weights-removed"])
def test_a_config_of_a_62_gb_model_is_refused_before_allocating(hs, tmp_path, monkeypatch, keep_weights):
    def edit(o):
        o["config"].update(hidden=10**6)
        if not keep_weights:
            o["state_dict"] = {}

    path = _tampered(hs, tmp_path / "big.pt", edit)
    devices = _meta_only(monkeypatch)
    with pytest.raises(CheckpointError, match=r"builds a model of 61976\d+ bytes .* over the limit of 2147483648"):
        load_checkpoint(path)
    assert devices == ["meta"]


@pytest.mark.parametrize("edit, why", [
    (lambda o: o["config"].update(hidden=200), r"gender.4.weight: \(96, \d+\) torch.float32, the model has \(200,"),
    (lambda o: o["state_dict"].update({k: v.double() for k, v in o["state_dict"].items() if k == "trunk.0.bias"}),
     "torch.float64, the model has .* torch.float32"),  # load_state_dict would have cast it silently
    (lambda o: o["state_dict"].pop("trunk.0.bias"), "trunk.0.bias: missing"),
], ids=["other-shape", "other-dtype", "missing"])
def test_tensors_that_do_not_fit_the_config_are_refused_before_allocating(hs, tmp_path, monkeypatch, edit, why):
    path = _tampered(hs, tmp_path / "misfit.pt", edit)
    devices = _meta_only(monkeypatch)
    with pytest.raises(CheckpointError, match="do not fit the model its config builds.*" + why):
        load_checkpoint(path)
    assert devices == ["meta"]


@pytest.fixture(scope="module")
def agr(tmp_path_factory) -> str:
    """A dlib-trunk model (its parameters do not depend on its input size, unlike hard_sharing's)."""
    return save_model(str(tmp_path_factory.mktemp("hostile") / "agr.pt"), "age_gender_race", seed=0)


@pytest.mark.parametrize("side", [100_000, 1025])
def test_an_input_size_out_of_bounds_is_refused_at_load(agr, tmp_path, monkeypatch, side):
    """image_size 100000 loaded and then the runner's warm-up asked for 60 GB (audit)."""
    path = _tampered(agr, tmp_path / "wide.pt", lambda o: o["config"].update(image_size=side))
    devices = _meta_only(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"input size must be two integers 1-1024 .*got \({side}, {side}\)"):
        load_checkpoint(path)
    assert devices == ["meta"]


def test_input_sizes_within_bounds_load(agr, tmp_path):
    path = _tampered(agr, tmp_path / "ok.pt", lambda o: o["config"].update(image_size=1024))
    assert load_checkpoint(path)[0].preprocessing.size == (1024, 1024)


# --- 3: the face template is checked on load --------------------------------------------------------------

_TEMPLATE = [[15.0, 20.0], [35.0, 20.0], [25.0, 28.0], [17.0, 36.0], [33.0, 36.0]]  # in hard_sharing's 50 px


@pytest.mark.parametrize("template, crop, why", [
    (_TEMPLATE, [1, 2, 3], "template_crop must be two integers"),
    (_TEMPLATE, [0, 0], "template_crop must be two integers"),
    (_TEMPLATE, [10**7, 10**7], "template_crop must be two integers"),
    ([[math.nan, 1.0]] + _TEMPLATE[1:], None, "5 finite"),
    ([[math.inf, 1.0]] + _TEMPLATE[1:], None, "5 finite"),
    ([[5.0, 5.0]] * 5, None, "degenerate"),  # coincident: no similarity to fit
    ([_TEMPLATE[1], _TEMPLATE[0]] + _TEMPLATE[2:], None, "degenerate"),  # the eyes swapped: a face upside down
    ([[24.0, 20.0], [25.0, 20.0]] + _TEMPLATE[2:], None, "degenerate"),  # eyes 2 % of the width apart
    ([[15.0, 40.0], [35.0, 40.0]] + _TEMPLATE[2:], None, "degenerate"),  # eyes below the mouth
    ([[-15.0, 20.0]] + _TEMPLATE[1:], None, "not inside"),
    ([[15.0, 20.0], [35.0, 20.0], [25.0, 28.0], [17.0, 36.0], [33.0, 51.0]], None, "not inside"),
    (_TEMPLATE[:4], None, "5"),
], ids=["crop-3-sides", "crop-0", "crop-huge", "nan", "inf", "one-point", "eyes-swapped", "eyes-close",
        "eyes-below-mouth", "outside-left", "outside-bottom", "four-points"])
def test_a_bad_face_template_is_refused_at_load(hs, tmp_path, template, crop, why):
    path = _tampered(hs, tmp_path / "tpl.pt",
                     lambda o: o["preprocessing"].update(template=template, template_crop=crop))
    with pytest.raises(CheckpointError, match=why):
        load_checkpoint(path)


def test_a_good_face_template_loads_and_aligns(hs, tmp_path):
    from faces.align import align

    path = _tampered(hs, tmp_path / "tpl.pt",
                     lambda o: o["preprocessing"].update(template=_TEMPLATE, template_crop=[109, 89]))
    model, _ = load_checkpoint(path)
    assert model.preprocessing.template == tuple(map(tuple, _TEMPLATE)) and model.preprocessing.template_crop == (109, 89)
    img = torch.randint(0, 256, (3, 300, 300), dtype=torch.uint8)
    pts = torch.tensor([[[110.0, 120.0], [190.0, 120.0], [150.0, 160.0], [115.0, 200.0], [185.0, 200.0]]])
    crops, _ = align(img, pts, model.preprocessing)
    assert tuple(crops.shape) == (1, 1, 50, 50)


# --- 4: backbone and dlib weights are read bounded --------------------------------------------------------

def test_backbone_weights_from_a_fifo_fail_fast(tmp_path):
    from models.backbones import resnet

    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    box: list = []
    t = threading.Thread(target=lambda: box.append(_error_of(lambda: resnet(18, weights=str(fifo)))), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # let the blocked open return (a writer appears, then closes), so nothing is left hanging
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert box and isinstance(box[0], CheckpointError) and "not a regular file" in str(box[0]), box


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned for the test to look at
        return e
    return None


def test_backbone_weights_over_the_limit_are_refused(tmp_path, monkeypatch):
    from models.backbones import load_state_dict  # what resnet() and HMTNet's load_backbone read with

    torch.save({"fc.weight": torch.zeros(1000, 512)}, tmp_path / "w.pth")
    monkeypatch.setenv(MAX_BYTES_ENV, "100000")
    with pytest.raises(CheckpointError, match="over the limit of 100000"):
        load_state_dict(str(tmp_path / "w.pth"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_backbone_weights_with_a_view_over_a_small_storage_are_refused(tmp_path, legacy):
    from models.backbones import load_state_dict

    torch.save({"fc.weight": torch.zeros(1).expand(1000, 512)}, tmp_path / "w.pth",
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="a view of shape"):
        load_state_dict(str(tmp_path / "w.pth"))


def test_dlib_weights_are_read_bounded_before_their_hash(tmp_path, monkeypatch):
    from models.dlib_format import DlibFormatError
    from models.dlib_resnet import load_weights

    big = tmp_path / "dlib.dat"
    with open(big, "wb") as f:
        f.truncate(2 << 20)  # sparse
    monkeypatch.setenv(MAX_BYTES_ENV, str(1 << 20))
    with pytest.raises(DlibFormatError, match=f"over the limit of {1 << 20}"):
        load_weights(big)


def test_a_training_runs_checkpoint_files_are_read_bounded_as_every_checkpoint_is(tmp_path, monkeypatch):
    """A run folder is storage like any other: the resuming worker and the export read its files through
    read_checked, refused over the size limit and never blocking on a FIFO planted in it."""
    import os
    import types

    import pyarrow.fs as pafs

    from raytasks.train.worker import read_checkpoint_file

    ckpt = types.SimpleNamespace(filesystem=pafs.LocalFileSystem(), path=str(tmp_path))
    (tmp_path / "model.pt").write_bytes(b"x" * 2000)
    assert read_checkpoint_file(ckpt, "model.pt") == b"x" * 2000
    monkeypatch.setenv(MAX_BYTES_ENV, "1000")
    with pytest.raises(CheckpointError, match="over the limit of 1000"):
        read_checkpoint_file(ckpt, "model.pt")
    os.mkfifo(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint_file(ckpt, "state.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_file(ckpt, "missing.pt")
