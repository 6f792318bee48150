"""Drawn faces: the labels written in each format's files are the ones the generator drew, the same seed
gives the same bytes, landmarks sit where the features are drawn, and every CelebA attribute varies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facedata import synth
from facedata.datasets import CELEBA_ATTRIBUTES, SCUT_RACES, UTKFACE_RACES
from facedata.draw import draw_face


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def test_celeba_files_hold_the_generated_labels(tmp_path):
    out = synth.generate("celeba", 12, str(tmp_path / "c"), seed=5)
    expected = {name: labels for name, _, labels in synth.iter_faces("celeba", 12, seed=5)}

    attr = _lines(Path(out) / "list_attr_celeba.txt")
    assert attr[0] == ["12"] and tuple(attr[1]) == CELEBA_ATTRIBUTES
    assert {row[0]: [int(v) for v in row[1:]] for row in attr[2:]} == {
        n: lab["attributes"] for n, lab in expected.items()
    }
    marks = _lines(Path(out) / "list_landmarks_align_celeba.txt")
    assert marks[0] == ["12"] and len(marks[1]) == 10
    assert {row[0]: [int(v) for v in row[1:]] for row in marks[2:]} == {
        n: lab["landmarks"] for n, lab in expected.items()
    }
    part = dict(_lines(Path(out) / "list_eval_partition.txt"))
    assert sorted(part) == sorted(expected)
    assert set(part.values()) == {"0", "1", "2"}
    for name, lab in expected.items():
        with Image.open(Path(out) / "img_align_celeba" / name) as img:
            assert img.size == (178, 218) and img.mode == "RGB"
        male = lab["attributes"][CELEBA_ATTRIBUTES.index("Male")]
        assert male == (1 if lab["gender"] == 0 else -1)


def test_utkface_names_and_scut_labels_hold_the_generated_labels(tmp_path):
    utk = Path(synth.generate("utkface", 10, str(tmp_path / "u"), seed=1))
    names = sorted(p.name for p in utk.iterdir())
    expected = {n: lab for n, _, lab in synth.iter_faces("utkface", 10, seed=1)}
    assert names == sorted(expected)
    for name, lab in expected.items():
        age, gender, race = (int(v) for v in name.split("_")[:3])
        assert (age, gender, race) == (lab["age"], lab["gender"], lab["race"])
        assert 1 <= age <= 90 and 0 <= race < len(UTKFACE_RACES)
        assert Image.open(utk / name).size == (200, 200)

    scut = Path(synth.generate("scut_fbp5500", 10, str(tmp_path / "s"), seed=1, size="120x120"))
    expected = {n: lab for n, _, lab in synth.iter_faces("scut_fbp5500", 10, seed=1, size=(120, 120))}
    scores = {n: float(v) for n, v in _lines(scut / "train_test_files" / "All_labels.txt")}
    assert scores == {n: lab["beauty"] for n, lab in expected.items()}
    for name, lab in expected.items():
        assert name[0] == ("A" if SCUT_RACES[lab["race"]] == "Asian" else "C")
        assert name[1] == ("F" if lab["gender"] == 1 else "M")
        assert 1.0 <= lab["beauty"] <= 5.0
        assert Image.open(scut / "Images" / name).size == (120, 120)


def test_same_seed_gives_identical_bytes(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(Path(synth.generate("celeba", 6, str(tmp_path / "a"), seed=3)))
    b = files(Path(synth.generate("celeba", 6, str(tmp_path / "b"), seed=3)))
    c = files(Path(synth.generate("celeba", 6, str(tmp_path / "c"), seed=4)))
    assert a == b
    assert a.keys() == c.keys() and a["img_align_celeba/000001.jpg"] != c["img_align_celeba/000001.jpg"]
    # Face i depends on (seed, i) only, not on how many are drawn.
    more = files(Path(synth.generate("celeba", 8, str(tmp_path / "d"), seed=3)))
    assert more["img_align_celeba/000006.jpg"] == a["img_align_celeba/000006.jpg"]


def test_landmarks_lie_inside_the_image_on_the_drawn_features():
    size = (178, 218)
    for i in range(40):
        img, lab = draw_face(np.random.default_rng([9, i]), size)
        xy = np.array(lab["landmarks"]).reshape(5, 2)
        assert ((xy >= 0) & (xy < size)).all(), xy
        left_eye, right_eye, nose, left_mouth, right_mouth = xy
        assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
        if lab["attributes"][CELEBA_ATTRIBUTES.index("Blurry")] == -1:
            gray = np.asarray(img.convert("L"), dtype=float)
            for x, y in (left_eye, right_eye):  # the pupil (or a dark lens) is drawn at the eye landmark
                assert gray[y, x] < 90, (i, x, y, gray[y, x])


def test_every_celeba_attribute_varies_and_labels_agree():
    rng_labels = [draw_face(np.random.default_rng([2, i]), (64, 64))[1] for i in range(300)]
    attrs = np.array([lab["attributes"] for lab in rng_labels])
    assert set(np.unique(attrs)) == {-1, 1}
    never = [a for a, col in zip(CELEBA_ATTRIBUTES, attrs.T) if len(set(col)) < 2]
    assert never == []
    col = {a: attrs[:, k] for k, a in enumerate(CELEBA_ATTRIBUTES)}
    gender = np.array([lab["gender"] for lab in rng_labels])
    age = np.array([lab["age"] for lab in rng_labels])
    beauty = np.array([lab["beauty"] for lab in rng_labels])
    assert ((col["Male"] == 1) == (gender == 0)).all()
    assert ((col["Young"] == 1) == (age < 35)).all()
    assert ((col["Smiling"] == 1) == np.array([lab["smile"] == 1 for lab in rng_labels])).all()
    assert ((col["Attractive"] == 1) == (beauty >= 3.0)).all()
    assert 1 <= age.min() and age.max() <= 90 and beauty.std() > 0.3
    # Hair colours are exclusive; beards only on men.
    hair = sum(col[a] == 1 for a in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"))
    assert hair.max() == 1
    assert not ((col["Goatee"] == 1) & (gender == 1)).any()
    # Grey hair goes with age.
    assert age[col["Gray_Hair"] == 1].mean() > age[col["Gray_Hair"] == -1].mean() + 15


def test_cli_writes_the_format(tmp_path, capsys):
    from jobs import synth as job

    assert job.main is synth.main
    synth.main(["--format", "utkface", "--n", "3", "--out", str(tmp_path / "u"), "--seed", "2", "--size", "64x64"])
    assert len(list((tmp_path / "u").glob("*.jpg.chip.jpg"))) == 3
    assert "wrote 3 utkface faces" in capsys.readouterr().out
    with pytest.raises(ValueError, match="too small"):
        synth.generate("utkface", 1, str(tmp_path / "x"), size="8x8")
    img = Image.open(io.BytesIO(next((tmp_path / "u").iterdir()).read_bytes()))
    assert img.size == (64, 64)
