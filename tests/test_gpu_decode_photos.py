"""``--gpu-decode`` with face detection: the label job's CPU stage sends the JPEGs the GPU can take as bytes and
the actor decodes them (raytasks/label/gpu_decode.py ``photos_on_device``: nvjpeg on a GPU). Here the same
torch code runs with ``device="cpu"`` (``torchvision.io.decode_jpeg`` decodes on the CPU too), so what is
checked is what the actor does with the batch: the rows equal those of the CPU decode path, a photo over the
decode size is shrunk to the same size and scale, and a file the decoder refuses becomes its error row.
Timed on a GPU by bench/bench_gpu_photos.py. No Ray cluster (Ray's own Arrow -> numpy conversion only)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from facedata.decode import Photos, Whole, decode_batch
from models.preprocess import decode_photo
from raytasks.label.decoding import read_and_decode
from raytasks.label.gpu_decode import gpu_decode_photos, images_on_device, photos_on_device
from tests.images import compose, real_crops, write_files

MAX_SIDE = 2048


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    crops = real_crops(3)
    small = compose(crops[:2], [(100, 120, 220), (560, 200, 160)], size=(900, 640), seed=4)
    return {
        "big.jpg": compose(crops[2:], [(1200, 700, 500)], size=(3000, 2000), seed=3),  # shrunk to 2048 x 1365
        "small.jpg": small,
        "cut.jpg": small[: len(small) // 3],  # a truncated JPEG: torchvision's CPU decode_jpeg refuses it
        "note.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # not for the GPU: the CPU stage gives its error row
    }


def _actor_batch(folder, names: list[str]) -> dict:
    """What the actor receives: read_and_decode's Arrow table as Ray Data hands it over (numpy batch format)."""
    from ray.data.block import BlockAccessor

    faces = {"mode": "detect", "max_side": MAX_SIDE, "detector": {}}
    table = read_and_decode(pa.table({"path": [str(folder / n) for n in names]}), faces, [], jpegs_to_actor=True)
    return BlockAccessor.for_block(table).to_batch_format("numpy")


@pytest.mark.parametrize("torch_decode", [True, None], ids=["torch-decoder", "cpu-actor-default"])
def test_photos_decoded_in_the_actor_label_as_the_cpu_path(tmp_path, files, hs_annotator, torch_decode):
    """``torch_decode``: the GPU's way (torchvision's decoder, here on the CPU), or the default on a CPU actor
    (``--actor-decode``: the CPU stage's own decoder, with its JPEG draft mode: the same pixels)."""
    write_files(tmp_path, files)
    names = list(files)
    batch = _actor_batch(tmp_path, names)
    # the cut JPEG (no end marker: nvjpeg would decode it without an error) and the PNG stay on the CPU
    assert [d is not None for d in batch["jpeg_bytes"]] == [True, True, False, False]
    raw = list(batch.pop("jpeg_bytes"))
    raw[2] = files["cut.jpg"]  # sent anyway, as if it had passed: the decoder's refusal goes to the CPU decoder
    got = photos_on_device(batch, raw, MAX_SIDE, hs_annotator.device, torch_decode=torch_decode)
    want = decode_batch([str(tmp_path / n) for n in names], [files[n] for n in names], Photos(MAX_SIDE))
    assert list(got["ok"]) == list(want["ok"]) == [True, True, False, False]
    assert list(got["error_kind"]) == list(want["error_kind"]) and got["error_kind"][3] is not None
    assert list(got["width"]) == list(want["width"]) and list(got["height"]) == list(want["height"])
    for i in (0, 1):
        g, w = np.asarray(got["image"][i]), np.asarray(want["image"][i])
        assert g.shape == w.shape and got["scale"][i] == pytest.approx(want["scale"][i], rel=1e-6)
        assert torch_decode or np.array_equal(g, w)  # the CPU actor decodes as the CPU stage does
        # the same JPEG decoder family: equal below the decode size, within a few levels after the shrink
        # (area averaging here, PIL's draft and bilinear on the CPU path)
        # (measured: 0 and 0.36 grey levels on average)
        assert np.abs(g.astype(int) - w.astype(int)).mean() < (0.05 if i == 1 else 1.0)
    rows = hs_annotator.annotate(got)
    ref = hs_annotator.annotate(want)
    assert rows["path"] == ref["path"] and rows["face"] == ref["face"] and rows["faces"] == ref["faces"]
    assert sum(f is not None for f in rows["face"]) >= 3  # every pasted face found, on both paths
    for k in ("gender_prob", "face_box"):
        for a, b in zip(rows[k], ref[k]):
            assert (a is None) == (b is None)
            if a is not None:
                assert np.allclose(a, b, atol=0.05 if k == "gender_prob" else 3.0), (k, a, b)


def test_whole_images_decoded_in_the_actor_label_as_the_cpu_path(tmp_path, files, hs_annotator):
    """``--faces whole``: the same for the model's input (``images_on_device``, hard_sharing's 50 px grey):
    rows, sizes and geometry as the CPU decode path's, pixels within a few levels, a refused JPEG its error row."""
    from ray.data.block import BlockAccessor

    write_files(tmp_path, files)
    names = list(files)
    (pre,) = hs_annotator.preprocessings
    table = read_and_decode(pa.table({"path": [str(tmp_path / n) for n in names]}), {"mode": "whole"},
                            [pre.to_dict()], jpegs_to_actor=True)
    batch = BlockAccessor.for_block(table).to_batch_format("numpy")
    assert [d is not None for d in batch["jpeg_bytes"]] == [True, True, False, False]
    raw = list(batch.pop("jpeg_bytes"))
    raw[2] = files["cut.jpg"]  # as if it had passed: the decoder's refusal goes to the CPU decoder
    got = images_on_device(batch, raw, pre, hs_annotator.device)
    want = decode_batch([str(tmp_path / n) for n in names], [files[n] for n in names], Whole((pre,)))
    assert list(got["ok"]) == list(want["ok"]) == [True, True, False, False]
    assert list(got["error_kind"]) == list(want["error_kind"]) and got["error_kind"][2] == "truncated"
    assert list(got["width"]) == list(want["width"]) and list(got["height"]) == list(want["height"])
    assert np.allclose(np.asarray(got["geometry_0"])[:2], np.asarray(want["geometry_0"])[:2])
    g, w = np.asarray(got["image_0"])[:2].astype(int), np.asarray(want["image_0"])[:2].astype(int)
    assert g.shape == w.shape and np.abs(g - w).mean() < 6.0
    rows, ref = hs_annotator.annotate(got), hs_annotator.annotate(want)
    assert rows["path"] == ref["path"] and rows["ok"] == ref["ok"] and rows["error_kind"] == ref["error_kind"]
    for a, b in zip(rows["gender_prob"], ref["gender_prob"]):
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 0.05), (a, b)


def test_the_photo_decoder_matches_decode_photo_sizes_and_names_what_it_refuses(files):
    out = gpu_decode_photos([files["big.jpg"], files["small.jpg"], files["cut.jpg"]], MAX_SIDE, "cpu")
    for res, name in zip(out[:2], ("big.jpg", "small.jpg")):
        img, size, scale = res
        ref, ref_size, ref_scale = decode_photo(files[name], MAX_SIDE)
        assert tuple(img.shape) == tuple(ref.shape) and size == ref_size and scale == pytest.approx(ref_scale)
    assert max(out[0][0].shape[1:]) == MAX_SIDE and out[0][1] == (3000, 2000)
    assert isinstance(out[2], Exception)
    # a 12 MP phone photo: the CPU decoder's JPEG draft gives half size (2016 px, under MAX_SIDE), and so does
    # this decoder, by averaging 2 x 2 pixels of the whole decode
    phone = compose(real_crops(1), [(1500, 900, 600)], size=(4032, 3024), seed=6)
    (img, size, scale), = gpu_decode_photos([phone], MAX_SIDE, "cpu")
    ref, ref_size, ref_scale = decode_photo(phone, MAX_SIDE)
    assert tuple(img.shape) == tuple(ref.shape) == (3, 1512, 2016) and size == ref_size and scale == ref_scale == 2.0
    assert (img.int() - ref.int()).abs().float().mean() < 3.0


def test_only_a_jpeg_that_ends_with_its_end_marker_goes_to_the_gpu(files):
    """nvjpeg decodes a truncated JPEG without an error (measured on an H200): such a file, and one with bytes
    after its image, stay on the CPU path, which labels it or gives its ``truncated`` row."""
    from raytasks.label.gpu_decode import jpeg_for_gpu

    small = files["small.jpg"]
    assert jpeg_for_gpu(small) and jpeg_for_gpu(small + b"\x00\x00\r\n")  # padding after the end marker is fine
    assert not jpeg_for_gpu(files["cut.jpg"])
    trailer = small + b"camera maker's trailer" * 8
    assert not jpeg_for_gpu(trailer)
    assert decode_photo(trailer, MAX_SIDE)[1] == decode_photo(small, MAX_SIDE)[1]  # the CPU path reads it


def test_actor_decode_on_a_cpu_actor_labels_as_the_decode_tasks(tmp_path, files, hs_checkpoint, hs_annotator):
    """``--actor-decode``: the label job's actor class itself, on the CPU, given the CPU stage's batch with the
    JPEGs as bytes, returns the rows the decode-task path gives; the spec takes it with detection only."""
    import pyarrow as pa

    from core.modelset import ModelSet
    from raytasks.label import LabelError, LabelSpec
    from raytasks.label.stages import AnnotatorActor

    write_files(tmp_path, files)
    names = list(files)
    faces = {"mode": "detect", "max_side": MAX_SIDE, "detector": {}}
    actor = AnnotatorActor(ModelSet(((None, hs_checkpoint),)).to_dict(), faces=faces, precision="fp32",
                           device="cpu", threads=2, actor_decode=True)
    got = actor(_actor_batch(tmp_path, names))
    assert isinstance(got, pa.Table)
    want = hs_annotator.annotate(decode_batch([str(tmp_path / n) for n in names], [files[n] for n in names],
                                              Photos(MAX_SIDE)))
    rows = got.to_pydict()
    assert rows["path"] == want["path"] and rows["face"] == want["face"] and rows["ok"] == want["ok"]
    assert rows["error_kind"] == want["error_kind"]  # the cut JPEG: truncated, the PNG: its own error
    for a, b in zip(rows["gender_prob"], want["gender_prob"]):
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 0.05)
    LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), actor_decode=True).validate()  # no GPU needed
    with pytest.raises(LabelError, match="--actor-decode decodes photos"):
        LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), actor_decode=True,
                  faces={"mode": "whole"}).validate()
