"""Registry, output description (losses, metrics, decoding) and the checkpoint format."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

import models
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.landmarks import Landmarks
from models.outputs import AgeDistribution, Binary, Categorical, Regression
from models.outputset import add_stats, finalize_metrics

ZOO = ["age_gender_race", "dmm_cnn", "hard_sharing", "hmtnet", "task_attention"]


def test_registry_lists_the_five_models_and_rejects_unknown_names():
    assert models.list_models() == ZOO
    with pytest.raises(ValueError, match="unknown model"):
        models.create_model("resnet9000")
    with pytest.raises(ValueError, match="accepted"):
        models.create_model("hard_sharing", no_such_option=1)


@pytest.mark.parametrize("name", ZOO)
def test_every_model_declares_outputs_preprocessing_and_recipe(name):
    cls = models.model_class(name)
    assert cls.name == name
    size = {"hard_sharing": {}, "age_gender_race": {"image_size": 112}}  # dlib's face ResNet needs >= 103 px
    m = models.create_model(name, **size.get(name, {"image_size": 96}))
    assert m.outputs.names() and m.preprocessing.size and m.recipe.lr > 0
    fields = m.outputs.fields()
    assert len({f.name for f in fields}) == len(fields)  # Parquet/JSON columns are unique
    assert pa.schema(fields)  # a valid Arrow schema
    assert m.config and isinstance(m.config, dict)


def test_categorical_stats_and_metrics_by_hand():
    o = Categorical("race", classes=("a", "b", "c"))
    raw = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    target = torch.tensor([0.0, 1, 0, float("nan")])  # 2 of 3 labelled rows right, one unlabelled
    s = o.stats(raw, target)
    m = o.metrics(s)
    assert m["race.accuracy"] == pytest.approx(2 / 3)
    assert s["confusion"].tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    cols = o.to_columns(raw[:2])
    assert cols["race"] == ["a", "b"] and len(cols["race_probs"][0]) == 3


def test_binary_thresholds_fp_fn_and_mean_accuracy():
    o = Binary("attributes", labels=("A", "B"), loss_type="mse_pm1")
    raw = torch.tensor([[0.5, -0.2], [-0.5, 0.3], [0.2, 0.9]])
    target = torch.tensor([[1.0, -1], [1, -1], [-1, 1]])
    s = o.stats(raw, target, thresholds=torch.tensor([0.0, 0.0]))
    assert s["fp"].tolist() == [1, 1] and s["fn"].tolist() == [1, 0]
    m = finalize_metrics([o], {"attributes": s})
    assert m["A.accuracy"] == pytest.approx(1 / 3) and m["B.accuracy"] == pytest.approx(2 / 3)
    assert m["mean_accuracy"] == pytest.approx(0.5)
    # Eq. 2: per-attribute MSE on ±1 targets
    expected_a = ((0.5 - 1) ** 2 + (-0.5 - 1) ** 2 + (0.2 + 1) ** 2) / 3
    assert o.per_label_loss(raw, target)[0].item() == pytest.approx(expected_a)
    # a threshold of 0.25 flips the third row of A to negative
    cols = o.to_columns(raw, thresholds=torch.tensor([0.25, 0.0]))
    assert cols["A"] == [True, False, False] and cols["B"] == [False, True, True]


def test_binary_partial_labels_count_each_attribute_over_the_rows_that_have_it():
    """GENKI-4K's smile read as DMM-CNN's ``Smiling`` (the other attributes missing, NaN) beside CelebA rows
    with all of them: each attribute's loss, accuracy and counts are over the rows that have it, and a fully
    labelled batch reads as before."""
    nan = float("nan")
    for loss_type in ("mse_pm1", "bce"):
        o = Binary("attributes", labels=("A", "B", "C"), loss_type=loss_type)
        raw = torch.tensor([[0.5, -0.2, 0.1], [-0.5, 0.3, 0.2], [0.2, 0.9, -0.4], [0.7, -0.8, 0.6],
                            [0.3, 0.3, 0.3]],
                           requires_grad=True)
        full = torch.tensor([[1.0, -1, 1], [1, -1, -1], [-1, 1, 1]])
        partial = torch.tensor([[nan, 1, nan], [nan, nan, nan]])  # a smile-only row and a row with nothing
        target = torch.cat([full, partial])
        per = o.per_label_loss(raw, target)
        assert torch.allclose(per[[0, 2]], o.per_label_loss(raw[:3], full)[[0, 2]])  # A and C: the CelebA rows
        b_raw, b_pos = raw[:4, 1].detach(), torch.tensor([0.0, 0, 1, 1])  # B: 3 CelebA rows + the smile row
        if loss_type == "bce":
            expected_b = torch.nn.functional.binary_cross_entropy_with_logits(b_raw, b_pos).item()
        else:
            expected_b = ((b_raw - (2 * b_pos - 1)) ** 2).mean().item()
        assert per[1].item() == pytest.approx(expected_b)
        loss = o.masked_loss(raw, target)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(raw.grad).all() and raw.grad[4].abs().sum() == 0  # the unlabelled row: no gradient
        assert o.masked_loss(raw[:3], full).item() == pytest.approx(o.loss(raw[:3], full).item())
        s = o.stats(raw.detach(), target)
        assert float(s["n"]) == 4 and s["n_label"].tolist() == [3, 4, 3]
        m = o.metrics(s)
        pred = (raw.detach() > 0)
        truth_b = torch.tensor([False, False, True, True])
        assert m["B.accuracy"] == pytest.approx(float((pred[:4, 1] == truth_b).float().mean()))
        assert "attributes.labels_scored" not in m
    only = o.stats(raw.detach()[3:], partial)  # a data set with one attribute (GENKI-4K for DMM-CNN)
    m = o.metrics(only)
    assert set(m) == {"B.accuracy", "attributes.mean_accuracy", "attributes.loss"}
    assert m["attributes.mean_accuracy"] == m["B.accuracy"] == 0.0  # -0.8 on a smile


def test_regression_metrics_match_numpy():
    rng = np.random.default_rng(0)
    y = rng.uniform(1, 5, 50)
    x = y + rng.normal(0, 0.3, 50)
    o = Regression("beauty", range=(1, 5), loss_type="smooth_huber")
    half = 25  # summed over two batches, as across workers
    s = add_stats(None, {"beauty": o.stats(torch.tensor(x[:half]), torch.tensor(y[:half], dtype=torch.float32))})
    s = add_stats(s, {"beauty": o.stats(torch.tensor(x[half:]), torch.tensor(y[half:], dtype=torch.float32))})
    m = o.metrics(s["beauty"])
    c = np.clip(x, 1, 5)  # the metrics measure the column, clamped to the range (4 of the 50 are outside it)
    assert (c != x).sum() > 0
    assert m["beauty.mae"] == pytest.approx(np.abs(c - y).mean(), rel=1e-5)
    assert m["beauty.rmse"] == pytest.approx(math.sqrt(((c - y) ** 2).mean()), rel=1e-5)
    assert m["beauty.pearson"] == pytest.approx(np.corrcoef(c, y)[0, 1], rel=1e-5)


def test_age_expectation_and_landmark_pixels():
    o = AgeDistribution("age", bins=117)
    raw = torch.full((1, 117), -1e4)
    raw[0, 20] = raw[0, 40] = 0.0
    assert o.to_columns(raw)["age"][0] == pytest.approx(30.0, abs=1e-3)
    geo = [{"input_w": 100, "input_h": 50, "sx": 2.0, "sy": 4.0, "tx": 10.0, "ty": 0.0}]
    # the centre of the model input: 0 on the default [-1, 1] scale, 0.5 on [0, 1]
    assert Landmarks("landmarks", points=1).to_columns(torch.tensor([[0.0, 0.0]]), geo)["landmarks"][0] == \
        pytest.approx([110.0, 100.0])
    lm = Landmarks("landmarks", points=1, scale="unit")
    assert lm.to_columns(torch.tensor([[0.5, 0.5]]), geo)["landmarks"][0] == pytest.approx([110.0, 100.0])


def _example_input(model, n=2):
    g = torch.Generator().manual_seed(0)
    c, (h, w) = model.preprocessing.channels, model.preprocessing.size
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    m = models.create_model("hard_sharing", hidden=32).eval()
    path = tmp_path / "hs.pt"
    digest = save_checkpoint(m, str(path), metrics={"mean_accuracy": 0.5})
    m2, info = load_checkpoint(str(path))
    assert info.hash == digest and info.model == "hard_sharing" and info.config["hidden"] == 32
    assert info.metrics == {"mean_accuracy": 0.5} and info.preprocessing["channels"] == 1
    x = m.prepare(_example_input(m))
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_refuses_tampering_and_plain_pickle(tmp_path):
    m = models.create_model("hard_sharing")
    path = tmp_path / "hs.pt"
    save_checkpoint(m, str(path))
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["trunk.0.bias"] += 1.0
    torch.save(obj, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_checkpoint(str(tmp_path / "tampered.pt"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "faceattr-checkpoint/1", "x": Evil()}))
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(str(tmp_path / "evil.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_on_s3(s3_bucket):
    client, bucket = s3_bucket
    m = models.create_model("hard_sharing")
    uri = f"s3://{bucket}/models/hs.pt"
    digest = save_checkpoint(m, uri)
    assert client.head_object(Bucket=bucket, Key="models/hs.pt")["ContentLength"] > 1000
    m2, info = load_checkpoint(uri)
    assert info.hash == digest


def test_a_large_s3_object_is_read_in_few_requests(s3_bucket, caplog):
    # A checkpoint or a training state of tens of MB is read whole (storage.read_bytes, read_all) or bounded
    # (read_bounded, checkpoints): one GET after the HEAD, or one a 16 MB chunk, not one per 256 KB (a stream's
    # read() without a size), each a round trip to S3. Counted in moto's request log (a real socket).
    import logging

    import storage

    client, bucket = s3_bucket
    data = np.random.default_rng(0).bytes(20 << 20)  # 20 MB: 80 GETs of 256 KB, 2 of 16 MB
    client.put_object(Bucket=bucket, Key="big.bin", Body=data)
    uri = f"s3://{bucket}/big.bin"

    def gets(read) -> int:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            assert read() == data
        return sum(f"GET /{bucket}/big.bin" in r.getMessage() for r in caplog.records)

    assert gets(lambda: storage.read_bytes(uri)) == 1
    assert gets(lambda: storage.read_bounded(uri, 32 << 20, 60)) == 2
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:  # what the count would be without read_all: the log does count GETs
        assert gets(f.read) == 80


def test_backbone_weights_by_path_are_loaded_safely(tmp_path):
    from models.backbones import load_state_dict, resnet

    src = resnet(18)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    net = resnet(18, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(net.conv1.weight, src.conv1.weight)
    buf = io.BytesIO()
    torch.save({"state_dict": src.state_dict()}, buf)
    (tmp_path / "wrapped.pt").write_bytes(buf.getvalue())
    assert set(load_state_dict(str(tmp_path / "wrapped.pt"))) == set(src.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        resnet(50, weights=str(tmp_path / "r18.pth"))
