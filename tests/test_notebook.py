"""The walkthrough notebook (notebooks/walkthrough.ipynb) runs top to bottom, headless, the way a user runs it
first: synthetic faces, the real train and label jobs at QUICK sizes, then the plots. Executed with nbclient in a
kernel of this environment (its own local Ray, stopped by the last cell), in a folder of its own.

What is checked is what a user looks at: every plot cell drew a figure, the label Parquet has exactly one row per
image of the folder and carries the exported checkpoint's hash, the accuracy table the notebook prints is the
accuracy of those Parquet rows against the dataset's truth, and no Ray process of the notebook outlives it.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is a dev dependency (pip install -e '.[dev]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a dev dependency (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 600

# Cells (by tag) and how many figures each must show.
FIGURES = {"data-faces": 1, "curves": 2, "accuracy": 1, "confusion": 1, "gallery": 1, "age": 1, "people": 1}


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _tagged(nb, tag: str):
    cells = [c for c in _code_cells(nb) if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one code cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _text(cell) -> str:
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream" and o.name == "stdout":
            parts.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            parts.append(o.data.get("text/plain", ""))
    return "".join(parts)


def _pngs(cell) -> int:
    return sum(1 for o in cell.outputs if o.output_type in ("display_data", "execute_result")
               and o.data.get("image/png"))


def test_notebook_is_stored_without_outputs():
    """Outputs stay out of git (small diffs, no stale numbers): every code cell is cleared."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} of {NOTEBOOK.name} hold outputs: clear them before committing"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for tag in (*FIGURES, "parameters", "train-dmm", "label-dmm", "parquet", "age-jobs", "set-job", "shutdown"):
        _tagged(nb, tag)


def _ray_processes(session_dir: str) -> list[int]:
    """Live processes whose command line names the notebook's Ray session folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if session_dir.encode() in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Execute the notebook once (QUICK, its work folder under pytest's tmp) and hand back (notebook, work)."""
    run_dir = tmp_path_factory.mktemp("notebook")
    work = run_dir / "work"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    from tests.helpers import RAY_TEST_ENV

    env = dict(os.environ, FACEATTR_NOTEBOOK_QUICK="1", FACEATTR_NOTEBOOK_WORK=str(work), **RAY_TEST_ENV)
    env.pop("RAY_ADDRESS", None)  # the notebook must start (and stop) a local Ray of its own
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(run_dir)}})
    start = time.perf_counter()
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, run_dir / "executed.ipynb")  # for a look after a failure
    print(f"notebook executed in {time.perf_counter() - start:.0f} s; outputs in {run_dir / 'executed.ipynb'}")
    return nb, work


@pytest.mark.ray
@pytest.mark.timeout(2 * CELL_TIMEOUT_S)
def test_notebook_runs_and_draws_every_figure(executed):
    nb, _ = executed
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    for tag, n in FIGURES.items():
        assert _pngs(_tagged(nb, tag)) >= n, f"cell {tag!r} shows {_pngs(_tagged(nb, tag))} figures, expected {n}"
    # The job commands are printed as a user would type them.
    assert "$ python -m jobs.train --model dmm_cnn" in _text(_tagged(nb, "train-dmm"))
    assert "$ python -m jobs.label --checkpoint" in _text(_tagged(nb, "label-dmm"))


@pytest.mark.ray
def test_label_parquet_has_one_row_per_image_from_the_exported_checkpoint(executed):
    from models.checkpoint import load_checkpoint

    _, work = executed
    for labels, images, ckpt, model in (
        ("dmm", work / "data" / "celeba" / "img_align_celeba", "dmm.pt", "dmm_cnn"),
        ("age_gender_race", work / "data" / "utkface", "age_gender_race.pt", "age_gender_race"),
    ):
        m, info = load_checkpoint(str(work / "models" / ckpt))
        assert info.model == model and m.preprocessing.size == (64, 64)
        out = work / "labels" / f"{labels}-{info.short_hash()}"  # one label output per checkpoint
        assert sorted(p.name for p in (work / "labels").iterdir() if p.name.startswith(labels + "-")) == [out.name]
        rows = pd.read_parquet(out)
        files = sorted(str(p) for p in images.rglob("*.jpg"))
        assert len(files) == 120  # N_FACES of the quick run
        assert len(rows) == len(files), f"{labels}: {len(rows)} rows for {len(files)} images"
        assert sorted(rows["path"]) == files
        assert rows["ok"].all()
        assert set(rows["checkpoint"]) == {info.hash} and set(rows["model"]) == {model}
    history = pd.read_csv(work / "runs" / "walkthrough-dmm" / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert (work / "runs" / "walkthrough-dmm" / "curves.png").stat().st_size > 0


@pytest.mark.ray
def test_printed_accuracy_is_the_accuracy_of_the_parquet_rows(executed):
    """The per-attribute table the notebook prints equals accuracy recomputed here from the Parquet rows and
    the dataset's own labels (test split), so the bars show the labels the job wrote."""
    from facedata.datasets import CELEBA_ATTRIBUTES, read_dataset
    from models.checkpoint import load_checkpoint

    nb, work = executed
    printed = {}
    for line in _text(_tagged(nb, "accuracy")).splitlines():
        m = re.match(r"^(\S+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$", line)
        if m:
            printed[m.group(1)] = float(m.group(2))
    assert set(printed) == set(CELEBA_ATTRIBUTES), "the accuracy table lists every CelebA attribute once"

    ds = read_dataset(f"celeba:{work / 'data' / 'celeba'}")
    _, info = load_checkpoint(str(work / "models" / "dmm.pt"))
    rows = pd.read_parquet(work / "labels" / f"dmm-{info.short_hash()}").set_index("path")
    test = ds.split("test")
    assert len(test) > 0
    truth = np.stack(test["attributes"].to_numpy()) > 0
    pred = rows.loc[test["path"], list(CELEBA_ATTRIBUTES)].to_numpy(dtype=bool)
    recomputed = dict(zip(CELEBA_ATTRIBUTES, (pred == truth).mean(0)))
    for attr in CELEBA_ATTRIBUTES:
        assert math.isclose(printed[attr], recomputed[attr], abs_tol=5e-4), (attr, printed[attr], recomputed[attr])
    mean = re.search(r"mean accuracy ([0-9.]+)", _text(_tagged(nb, "accuracy")))
    assert mean and math.isclose(float(mean.group(1)), float(np.mean(list(recomputed.values()))), abs_tol=5e-4)
    assert f"test images: {len(test)}" in _text(_tagged(nb, "accuracy"))


@pytest.mark.ray
def test_notebook_stops_its_ray(executed):
    nb, _ = executed
    out = _text(_tagged(nb, "shutdown"))
    m = re.search(r"Ray stopped: initialized=False, session (\S+)", out)
    assert m, out
    session = m.group(1)
    deadline = time.monotonic() + 30
    while _ray_processes(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(session), f"Ray processes of {session} still running after the notebook"


@pytest.mark.ray
def test_both_models_in_one_pass_and_faces_grouped_by_person(executed):
    """Section 6: one label job with both trained checkpoints and the embedding over group photos; every row
    holds both models' structs, and the embeddings group the found faces by the person that was pasted."""
    import pyarrow.parquet as pq

    nb, work = executed
    (out,) = [p for p in (work / "labels").iterdir() if p.name.startswith("set-")]
    table = pq.read_table(out)
    assert {"celeba", "agr", "embedding"} <= set(table.column_names)
    rows = table.to_pandas()
    faces = rows[rows["face"].notna()]
    assert len(faces) >= 10 and faces["embedding"].map(len).eq(128).all()
    assert faces["agr"].map(lambda s: s["model"]).eq("age_gender_race").all()
    assert faces["celeba"].map(lambda s: s["Smiling"] is not None).all()
    assert "--checkpoint celeba=" in _text(_tagged(nb, "set-job"))
    text = _text(_tagged(nb, "people"))
    said = re.search(r"(\d+) groups \((\d+) pasted people among the found faces\); every group one person: (\w+)", text)
    assert said and said.group(3) == "True", text  # no group mixes two people
    assert int(said.group(1)) <= int(said.group(2)) + 1, text  # at most one person split in two
    near = re.search(r"nearest other face is the same person for (\d+) of (\d+) faces", text)
    assert near and int(near.group(2)) >= 6 and near.group(1) == near.group(2), text
