"""core/annotator.py: a photo crosses to the models' device once per batch (detection, every alignment
and the quality crops all read that one copy), and the rows do not depend on where the pictures started."""

from __future__ import annotations

import torch

from core.rows import row_dicts
from facedata.decode import Photos, decode_batch
from tests.helpers import assert_same


class HostPicture(torch.Tensor):
    """A decoded picture that counts its moves to a device: its ``.to(...)`` returns a plain copy (as a
    host-to-GPU copy would be a new tensor), so a second move of the same picture counts again, while
    work on the moved copy does not."""

    moves: list[tuple[int, ...]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.to:
                cls.moves.append(tuple(args[0].shape))
                plain = args[0].as_subclass(torch.Tensor)
                out = plain.to(*args[1:], **kwargs)
                return out.clone() if out is plain else out
            out = func(*args, **kwargs)
            # the (h, w, 3) picture viewed as (3, h, w) (models.preprocess.photo_tensor) is still the host picture
            return out.as_subclass(cls) if func is torch.Tensor.permute else out


def test_each_photo_moves_to_the_device_once_and_rows_are_unchanged(hs_annotator, group_photo):
    data, n_faces = group_photo
    batch = decode_batch(["a.jpg", "b.jpg"], [data, data], Photos(hs_annotator.face_options.max_side))
    want = row_dicts(hs_annotator.annotate(batch))
    assert len(want) == 2 * n_faces  # the photo's faces were found: the alignment and quality ran

    spied = dict(batch, image=[torch.from_numpy(im.copy()).as_subclass(HostPicture) for im in batch["image"]])
    HostPicture.moves.clear()
    got = row_dicts(hs_annotator.annotate(spied))
    assert HostPicture.moves == [(3, *im.shape[:2]) for im in batch["image"]]  # once each, in order
    assert_same(got, want, "rows from counted pictures")
