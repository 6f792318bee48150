"""Issue #13 (hardening), the parts that need no Ray: reading files from a manifest or folder (sizes checked
before reading, only regular files, bounded per batch, timeouts), manifest path normalisation and
duplicates, --allow-prefix, and checkpoint integrity. Each test failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from facedata import inputs, paths, reading

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------
# item 5: reading files
# ------------------------------------------------------------------------------------------------------

def test_oversized_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: costs no disk, would cost 256+ MiB of memory to read
    code = ("import resource, sys; from facedata import reading; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"d, kind, msg = reading.fetch({str(big)!r}); "
            "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before; "
            "print(kind, grew // 1024, msg)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    kind, grew_mb, *msg = out.stdout.split()
    assert int(grew_mb) < 32, f"reading a refused file grew the process by {grew_mb} MB"
    assert kind == "too_large" and "314572800" in " ".join(msg)


def _in_thread(fn, timeout):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"still blocked after {timeout} s"
    return box[0]


def test_fifo_and_devices_are_not_read(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    assert _in_thread(lambda: reading.fetch(str(fifo)), 10)[1:] == ("unreadable", "not a regular file")
    assert reading.fetch("/dev/zero")[1:] == ("unreadable", "not a regular file")
    assert reading.fetch(str(tmp_path))[1:] == ("unreadable", "not a regular file")
    # a FIFO without an image extension in a folder: its first bytes are not read either (listing used to block)
    (tmp_path / "pipe").mkdir()
    os.mkfifo(tmp_path / "pipe" / "IMG_0001")
    stats = _in_thread(lambda: inputs.write_listing(str(tmp_path / "pipe"), str(tmp_path / "listing")), 10)
    assert (stats.files, stats.inputs) == (1, 0)


def test_reads_time_out(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"y")
    real = reading.fetch

    def slow(uri, max_bytes=reading.MAX_FILE_BYTES, allow=None):
        if uri.endswith("b.jpg"):
            time.sleep(5)  # a hung mount
        return real(uri, max_bytes, allow)

    monkeypatch.setattr(reading, "fetch", slow)
    t0 = time.perf_counter()
    res = reading.fetch_all([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], timeout=0.5)
    assert time.perf_counter() - t0 < 3
    assert res[0] == (b"x", None, None)
    assert res[1] == (None, "transient", "read timed out after 0.5 s (may succeed if run again)")



def test_each_read_has_its_own_time_and_stuck_threads_are_not_piled_up():
    """A batch of more files than threads, each read quick, is read whole however long the batch takes (the
    timeout runs from each read's start, not the batch's); a hung read per batch leaves one stuck thread, not
    a new pool's worth of idle ones; a pool whose every thread is stuck times the queued reads out too."""
    def quick(u):
        time.sleep(0.1)
        return u.encode(), None, None

    n = 6 * reading.FETCH_THREADS  # 6 rounds of 0.1 s: longer than the 0.4 s timeout
    res = reading.gather(quick, [str(i) for i in range(n)], 0.4)
    assert res == [(str(i).encode(), None, None) for i in range(n)]

    release = threading.Event()

    def hangs(u):
        if u == "hung":
            release.wait()
        return b"x", None, None

    before = threading.active_count()
    try:
        for _ in range(4):
            res = reading.gather(hangs, ["a", "hung", "b"], 0.2)
            assert [r[1] for r in res] == [None, "transient", None]
        # each hung read holds its thread; the pools it retired let their other threads go (once each is
        # scheduled to take its stop: waited for, on a loaded machine)
        deadline = time.monotonic() + 10
        while threading.active_count() > before + 4 + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before + 4 + 1, threading.active_count()
        t0 = time.perf_counter()
        res = reading.gather(lambda u: (release.wait(), (b"x", None, None))[1],
                             [str(i) for i in range(3 * reading.FETCH_THREADS)], 0.2)
        assert all(r == (None, "transient", "read timed out after 0.2 s (may succeed if run again)") for r in res)
        assert time.perf_counter() - t0 < 2
    finally:
        release.set()

def test_a_batch_is_read_a_bounded_chunk_at_a_time(tmp_path):
    uris = []
    for i in range(10):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(bytes(1000))
        uris.append(str(p))
    (tmp_path / "huge.jpg").write_bytes(bytes(5000))
    uris.insert(3, str(tmp_path / "huge.jpg"))
    chunks = list(reading.fetch_chunks(uris, max_batch_bytes=3000, max_bytes=4000))
    seen = sorted(i for c in chunks for i, _ in c)
    assert seen == list(range(11))
    for c in chunks:
        assert sum(len(r[0]) for _, r in c if r[0] is not None) <= 3000
    assert dict(i for c in chunks for i in c)[3][1] == "too_large"


# ------------------------------------------------------------------------------------------------------
# item 7: one row per distinct file in a manifest
# ------------------------------------------------------------------------------------------------------

def _listed(listing_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [p for f in sorted(listing_dir.glob("part-*.parquet")) for p in pq.read_table(f).column("path").to_pylist()]


def test_manifest_duplicates_are_one_file(tmp_path):
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    manifest = folder / "list.csv"
    rows = ["a.jpg", "./a.jpg", str(folder / "a.jpg"), "sub/../a.jpg", f"file://{folder}/a.jpg", ".//a.jpg",
            "b.jpg", "sub/b.jpg", "b.jpg"]
    manifest.write_text("path\n" + "\n".join(rows) + "\n")
    stats = inputs.write_manifest_listing(str(manifest), str(tmp_path / "listing"), str(folder), chunk=2)
    assert (stats.files, stats.inputs, stats.duplicates) == (9, 3, 6)
    assert _listed(tmp_path / "listing") == ["a.jpg", "b.jpg", "sub/b.jpg"]  # first spelling, manifest order


def test_s3_paths_are_normalised():
    n = paths.normalize_path
    assert n("s3://b/photos/./a.jpg") == n("s3://b/photos/x/../a.jpg") == "s3://b/photos/a.jpg"
    assert n("s3://b/photos//a.jpg") == "s3://b/photos//a.jpg"  # S3 keys are literal: another object
    assert n("./a.jpg", "s3://b/photos") == "s3://b/photos/a.jpg"
    assert n("s3://b/photos/a.jpg") != n("s3://b/photos/A.jpg")  # keys are case-sensitive


# ------------------------------------------------------------------------------------------------------
# item 9: --allow-prefix
# ------------------------------------------------------------------------------------------------------

def test_rows_outside_the_allowed_prefix_are_refused_alike(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_text("outside")
    (folder / "link.jpg").symlink_to(tmp_path / "secret.txt")  # a symlink out of the folder
    allow = (paths.default_allow_prefix(str(folder / "list.csv")),)
    assert allow == (str(folder),)
    uris = [str(folder / "ok.jpg"), "/etc/passwd", "/proc/self/environ", str(folder / "../secret.txt"),
            str(tmp_path / "no-such-file"), str(folder / "link.jpg"), str(folder) + "2/x.jpg", str(folder / "gone.jpg")]
    res = reading.fetch_all(uris, allow=allow)
    assert res[0] == (b"inside", None, None)
    for r in res[1:7]:  # existing or not, file or link: one answer that reveals nothing
        assert r == (None, "forbidden", "path is outside the allowed prefixes (--allow-prefix)")
    assert res[7] == (None, "unreadable", "file not found")  # inside the prefix: the usual answer


def test_s3_allow_prefix_keeps_other_buckets_and_prefixes_out():
    allow = (paths.default_allow_prefix("s3://photos-bucket/batch-1/list.parquet"),)
    assert allow == ("s3://photos-bucket/batch-1/",)
    ok = ["s3://photos-bucket/batch-1/a.jpg", "s3://photos-bucket/batch-1/sub/./b.jpg"]
    bad = ["s3://models-bucket/dmm.pt", "s3://photos-bucket/batch-10/a.jpg", "s3://photos-bucket/batch-1/../x.jpg",
           "/etc/passwd"]
    assert all(paths.is_allowed(u, allow) for u in ok) and not any(paths.is_allowed(u, allow) for u in bad)


def test_label_cli_takes_allow_prefix():
    from jobs.label import build_parser

    args = build_parser().parse_args(["--checkpoint", "c.pt", "--input", "in/", "--output", "out/",
                                      "--allow-prefix", "s3://a/", "--allow-prefix", "/data"])
    assert args.allow_prefix == ["s3://a/", "/data"]


# ------------------------------------------------------------------------------------------------------
# item 10: checkpoint integrity and pins
# ------------------------------------------------------------------------------------------------------

def _saved(tmp_path, name="hs.pt", **kw):
    import models
    from models.checkpoint import save_checkpoint

    path = str(tmp_path / name)
    digest = save_checkpoint(models.create_model("hard_sharing"), path, **kw)
    return path, digest


@pytest.mark.parametrize("edit", [
    lambda o: o["outputs"][0].update(name="renamed"),
    lambda o: o["preprocessing"].update(mean=[0.123]),
    lambda o: o["preprocessing"].update(size=[64, 64]),
    lambda o: o["metrics"].update(accuracy=0.99),
    lambda o: o["extra"].update(run="someone else's"),
], ids=["outputs", "preprocessing-mean", "preprocessing-size", "metrics", "extra"])
def test_every_described_field_is_covered_by_the_hash(tmp_path, edit):
    import torch

    from models.checkpoint import CheckpointError, load_checkpoint

    path, _ = _saved(tmp_path, metrics={"accuracy": 0.5}, extra={"run": "r1"})
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_checkpoint(str(tmp_path / "edited.pt"))


def test_pinned_checkpoint(tmp_path):
    from models.checkpoint import CheckpointError, load_checkpoint, split_pin

    path, digest = _saved(tmp_path)
    _, info = load_checkpoint(f"{path}#{digest}")
    assert info.hash == digest and info.uri == path
    other, other_digest = _saved(tmp_path, "other.pt", metrics={"x": 1.0})
    with pytest.raises(CheckpointError, match="not the pinned"):
        load_checkpoint(f"{other}#{digest}")  # a replaced file at a pinned URI
    for bad in (f"{path}#sha256:1234", f"{path}#sha256:{'g' * 64}"):
        with pytest.raises(CheckpointError, match="64 hex digits"):
            split_pin(bad)
    assert split_pin(f"s3://b/m.pt#{digest.upper().replace('SHA256', 'sha256')}") == ("s3://b/m.pt", digest)


@pytest.mark.parametrize("obj", [
    {"format": "FORMAT"},
    {"format": "FORMAT", "model": "hard_sharing", "config": {}, "outputs": [], "preprocessing": {},
     "metrics": {}, "extra": {}, "state_dict": [], "hash": "sha256:0"},
    {"format": "FORMAT", "model": 3, "config": None, "outputs": [], "preprocessing": {},
     "metrics": {}, "extra": {}, "state_dict": {}, "hash": "x"},
    ["not", "a", "dict"],
], ids=["no-fields", "state-dict-list", "mistyped", "list"])
def test_malformed_checkpoint_is_the_documented_error(tmp_path, obj):
    import torch

    from models.checkpoint import FORMAT, CheckpointError, load_checkpoint

    if isinstance(obj, dict):
        obj = {**obj, "format": FORMAT}  # the current format: what is malformed is the rest
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "bad.pt"))


def test_hash_matching_but_unbuildable_checkpoint_is_the_documented_error(tmp_path):
    import torch

    from models.checkpoint import CheckpointError, load_checkpoint
    from models.checkpoint_hash import hash_of

    path, _ = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["model"] = "no_such_model"
    obj["hash"] = hash_of(obj)
    torch.save(obj, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="does not build its model"):
        load_checkpoint(str(tmp_path / "unknown.pt"))


def test_format_1_checkpoints_are_refused_and_upgradable(tmp_path):
    import torch

    from models.checkpoint import CheckpointError, load_checkpoint, upgrade_checkpoint
    from models.checkpoint_hash import old_content_hash

    path, _ = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["format"] = "faceattr-checkpoint/1"
    obj["hash"] = old_content_hash(obj["model"], obj["config"], obj["state_dict"])
    torch.save(obj, tmp_path / "v1.pt")
    with pytest.raises(CheckpointError, match="python -m models.checkpoint upgrade"):
        load_checkpoint(str(tmp_path / "v1.pt"))
    new_hash = upgrade_checkpoint(str(tmp_path / "v1.pt"), str(tmp_path / "v2.pt"))
    assert load_checkpoint(str(tmp_path / "v2.pt"))[1].hash == new_hash
    obj["state_dict"]["trunk.0.bias"] += 1.0  # a changed format-1 file is not upgraded
    torch.save(obj, tmp_path / "v1-changed.pt")
    with pytest.raises(CheckpointError, match="hash mismatch"):
        upgrade_checkpoint(str(tmp_path / "v1-changed.pt"), str(tmp_path / "nope.pt"))


def test_label_and_serve_config_take_the_pin(tmp_path):
    from pydantic import ValidationError

    from raytasks import label as L
    from raytasks.serve import ServeArgs

    path, digest = _saved(tmp_path)
    ServeArgs.model_validate({"models": {"hs": f"{path}#{digest}", "b": {"checkpoint": f"{path}#{digest}"}}})
    with pytest.raises(ValidationError, match="64 hex digits"):
        ServeArgs.model_validate({"models": {"hs": f"{path}#sha256:abc"}})
    (tmp_path / "photos").mkdir()
    wrong = "sha256:" + "0" * 64
    spec = L.LabelSpec(checkpoint=f"{path}#{wrong}", input=str(tmp_path / "photos"), output=str(tmp_path / "out"))
    with pytest.raises(L.LabelError, match="not the pinned"):
        L.label(spec, echo=lambda *_: None)


def test_an_upgraded_format_1_checkpoint_keeps_the_readings_it_was_trained_with(tmp_path):
    """Issue 11 changed two defaults (task_attention shares through res5b; DMM-CNN's landmarks on [-1, 1]).
    A format-1 file of the old layout, saved without those arguments, upgrades to a file that builds the
    model it was trained as and loads its weights."""
    import torch

    import models
    from models.checkpoint import load_checkpoint, upgrade_checkpoint
    from models.checkpoint_hash import old_content_hash

    old = models.create_model("task_attention", depth=18, image_size=64, task_blocks=2)  # the old whole-res5 copy
    sd = {k: v.detach().clone() for k, v in old.state_dict().items()}
    config = {k: v for k, v in old.config.items() if k != "task_blocks"}  # format 1 knew no such argument
    obj = {"format": "faceattr-checkpoint/1", "model": "task_attention", "config": config,
           "outputs": old.outputs.describe(), "preprocessing": old.preprocessing.to_dict(), "state_dict": sd,
           "hash": old_content_hash("task_attention", config, sd)}
    torch.save(obj, tmp_path / "v1.pt")
    upgrade_checkpoint(str(tmp_path / "v1.pt"), str(tmp_path / "v2.pt"))
    model, info = load_checkpoint(str(tmp_path / "v2.pt"))
    assert info.config["task_blocks"] == 2 and model.task_blocks == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.allclose(old.eval()(x)[k], model(x)[k]) for k in ("smile", "gender"))
