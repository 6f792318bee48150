"""Faces too small for a model (issue #20 item 5): the row is kept with its box and points, says
``small_face``, and the label summary counts it; the limit follows the models' inputs unless it is set."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from faces.align import template_of
from faces.quality import ReviewThresholds
from models.dlib_resnet import chip_template
from models.preprocess import Preprocessing
from tests.images import PLACES, photos


def _eyes(pre: Preprocessing) -> float:
    t = template_of(pre)
    return float((t[1] - t[0]).norm())


def test_the_default_limit_is_the_largest_need_of_the_models_never_below_the_floor():
    small = Preprocessing(size=(50, 50), channels=1, mean=(0.0,), std=(1.0,))  # eyes about 12.6 px apart: a third is under the floor
    dlib = Preprocessing(size=(150, 150), template=chip_template())  # age_gender_race's chip: eyes 52.9 px apart
    th = ReviewThresholds()
    assert th.min_face_size is None and th.face_size_limit() == th.min_face_floor == 10.0
    assert th.resolve_face_size([small]).min_face_size == 10.0
    assert th.resolve_face_size([dlib]).min_face_size == pytest.approx(_eyes(dlib) / 3, abs=0.01)
    assert th.resolve_face_size([small, dlib]).min_face_size == th.resolve_face_size([dlib]).min_face_size
    assert th.resolve_face_size([]).min_face_size == 10.0
    assert ReviewThresholds(min_face_size=30).resolve_face_size([dlib]).min_face_size == 30  # set: kept
    assert ReviewThresholds(min_face_ratio=0.5).resolve_face_size([dlib]).min_face_size == pytest.approx(
        _eyes(dlib) / 2, abs=0.01)
    resolved = th.resolve_face_size([dlib])
    assert ReviewThresholds.from_dict(resolved.to_dict()) == resolved
    assert ReviewThresholds.from_dict(th.to_dict()) == th  # None round-trips


def test_a_face_below_the_limit_keeps_its_row_says_small_face_and_is_counted(hs_checkpoint, tmp_path):
    from core.annotator import Annotator
    from raytasks.label.output import output_stats

    items = {"three.jpg": photos()["three.jpg"]}  # three faces of different sizes
    plain = Annotator(hs_checkpoint, device="cpu", precision="fp32", threads=1)
    sizes = sorted(r["face_size"] for r in plain.annotate_bytes(list(items.items())))
    assert len(sizes) == len(PLACES["three.jpg"])
    limit = (sizes[0] + sizes[1]) / 2  # the smallest face is below it, the others above
    (pre,) = plain.preprocessings
    ann = Annotator(hs_checkpoint, device="cpu", precision="fp32", threads=1,
                    review={"min_face_ratio": limit / _eyes(pre), "min_face_floor": 1.0})
    assert ann.review.min_face_size == pytest.approx(limit, abs=0.01)
    rows = ann.annotate_bytes(list(items.items()))
    small = [r for r in rows if "small_face" in r["review_reasons"]]
    assert len(small) == 1 and small[0]["face_size"] == sizes[0] and small[0]["review"]
    assert len(small[0]["face_box"]) == 4 and len(small[0]["face_points"]) == 10  # the row is whole
    assert small[0]["gender"] in ("male", "female")
    assert all("small_face" not in r["review_reasons"] for r in rows if r is not small[0])
    (tmp_path / "labels").mkdir()
    pq.write_table(ann.to_table({k: [r[k] for r in rows] for k in rows[0]}), tmp_path / "labels" / "part.parquet")
    assert output_stats(str(tmp_path / "labels")).reasons["small_face"] == 1  # the summary's review_by_reason
