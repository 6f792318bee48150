"""Shared fixtures: one local Ray per test session, a real S3 endpoint (moto's server) on 127.0.0.1,
the path of the real face data, the checkpoints several modules use (made once per session), the face
detector, and a group photo. Helpers without state are in tests/helpers.py, the images and photos in
tests/images.py.

Every test that uses Ray (the ``ray_session`` fixture, directly or through another fixture) is marked
``ray`` here, so ``pytest -m "not ray"`` is the fast tier without any Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Threads that wait for work sleep instead of spinning (read by OpenMP when torch loads, so before the import
# below; Ray's processes inherit it from this environment). The suite runs two test processes, Ray clusters and
# their workers on 2 cores: a spinning OpenMP thread takes a core another process needs. Measured on five Ray and
# torch modules in two workers (2026-12-03, runs in turn spinning, passive, spinning, passive): 482, 379, 497, 433 CPU-s;
# pytest 245, 199, 254, 224 s. A user's jobs keep OpenMP's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two torch threads per test process (FACEATTR_TEST_THREADS to change it). One was tried (2026-12-03, the five
# modules above, passive OpenMP, two pairs in turn): 1 thread 397 and 368 CPU-s, pytest 211 and 223 s; 2 threads
# 421 and 356 CPU-s, 225 and 190 s. No clear gain: with one thread a core sat idle while the other test process
# waited on Ray (74 idle CPU-s against 20), so the default stays 2, as the golden rows were recorded.
torch.set_num_threads(int(os.environ.get("FACEATTR_TEST_THREADS", "2")))

RAY_FIXTURES = {"ray_session"}  # a test whose fixture closure holds one of these uses Ray


# `make test` runs two pytest-xdist workers that take work units in the order below. A unit is a whole module
# (module fixtures, such as the Serve application, are built once), except that the modules using the session's
# Ray cluster (SESSION_RAY_MODULES) are ONE unit: they run in one worker, so the suite starts one session cluster,
# not one per worker (each cost ~35 CPU-s a suite: its start, its daemons' polling, Ray Data's own actors), while the
# other worker takes the notebook (a Ray of its own) and the modules without Ray. The longest units first, so
# that the long ones do not meet at the end with one worker idle. (pytest-xdist's own `--dist loadgroup` cannot
# do this with pytest 9: it renames the items through `item._nodeid`, which pytest 9.2 no longer reads, and so
# silently sends every test on its own. Hence the scheduler below.)
SESSION_RAY = "session-ray"
# They run in this order: the two Serve modules last, as they share one Serve application (``svc`` below, a session
# fixture: built for the first, kept for the second, its replicas idle to the session's end with nothing after them).
SESSION_RAY_MODULES = ("test_faces_e2e.py", "test_label.py", "test_modelset.py", "test_recipes_runs.py", "test_resume_edges.py",
                       "test_train_faces.py", "test_serve.py", "test_serve_set.py")
# Measured in the suite (2026-12-07, junit times): the session-Ray unit 447 s, the notebook 129, training_local
# 88, serve_start 58, ray_start_cluster 54 and ops_stop_label 55 (whose SIGTERM test then moved into
# ray_start_cluster), face_backbone 50, photo_agreement 23, hardening 19, ddp 15, ops_s3_faults 15,
# report_hostile 14, report 13, report_scale 11. Not longest first after the notebook: the two other modules that
# start a Ray of their own (serve_start: two `jobs.serve` starts; ray_start_cluster) come next, so that they are
# done before the session unit deploys its Serve application (nine replica processes), and the in-process
# trainings meet that deployment instead. Measured on 2026-12-07 (pytest of the whole suite, the checkout,
# quiet): serve_start fourth, meeting the deployment, 119 s instead of 58 and 9 min 53 s in all; serve_start
# second and ray_start_cluster fifth (which then met it), 9 min 38 s; this order, 8 min 23 s.
LONGEST_FIRST = (SESSION_RAY, "test_notebook.py", "test_serve_start.py", "test_ray_start_cluster.py",
                 "test_training_local.py", "test_face_backbone.py", "test_photo_agreement.py", "test_hardening.py",
                 "test_ddp.py", "test_ops_s3_faults.py", "test_report_hostile.py", "test_report.py",
                 "test_report_scale.py")


def _unit(module: str) -> str:
    name = Path(module).name
    return SESSION_RAY if name in SESSION_RAY_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler by whole units (above), in the order the items are collected (sorted below)."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0])

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
            if item.path.name not in SESSION_RAY_MODULES:
                raise pytest.UsageError(f"{item.path.name} uses the session's Ray cluster (ray_session): add it to "
                                        "SESSION_RAY_MODULES in tests/conftest.py, so that it runs in the one "
                                        "worker that holds that cluster")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    unit = {item: _unit(item.path.name) for item in items}
    within = {name: i for i, name in enumerate(SESSION_RAY_MODULES)}  # the session-Ray unit in the order listed
    # stable: the order within a module stays
    items.sort(key=lambda item: (rank.get(unit[item], len(rank)), within.get(item.path.name, 0)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real UTKFace and CelebA faces); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA} (only present in the team's workspace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def svc(ray_session, s3_server, tmp_path_factory, group_photo, three):
    """The one Serve application of tests/test_serve.py and tests/test_serve_set.py (tests/serve_app.py), built
    once for both: a second one cost 45-50 s a suite. A session fixture, so it lives to the session's end; the two
    modules run last in the session-Ray unit (SESSION_RAY_MODULES), so no other test shares the cluster with it."""
    from tests.serve_app import serve_application

    yield from serve_application(ray_session, s3_server, tmp_path_factory, group_photo, three)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole test session (started on first use, stopped at the end). It depends on
    the S3 server so that Ray's worker processes inherit the endpoint's environment."""
    import ray

    from raytasks.reach import init_ray
    from tests.helpers import RAY_TEST_ENV

    if not ray.is_initialized():
        # in this process's environment too: the cluster's own processes (the log monitor) are started from it
        for k, v in RAY_TEST_ENV.items():
            os.environ.setdefault(k, v)
        # started as the jobs start a Ray of their own (raytasks/reach.py init_ray), so that Ray's State API asked
        # from inside it asks this cluster, not another test's Ray: it had asked 127.0.0.1:8265 or the last `ray
        # start` cluster, which knew none of its actors, and Ray Train's PlacementGroupCleaner took a live
        # controller for dead and removed its run's placement group (twice in four suites on 2026-12-07;
        # docs/benchmarks.md)
        init_ray(4, join=False, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **RAY_TEST_ENV}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP on 127.0.0.1 (moto's ThreadedMotoServer), with the AWS environment
    pointed at it for this process and for Ray workers started afterwards. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    _atomic_conditional_puts()
    _listed_once()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _listed_once() -> None:
    """moto's server lists its own package folder (a listdir and ~200 isdir calls) on every request, to see
    whether the Host header names a service (moto/moto_server/werkzeug_app.py, ``get_backend_for_host``); the
    folder does not change while the suite runs, so it is listed once. py-spy over the session-Ray modules
    (2026-12-04): 4 of the 21 CPU-s that moto's request threads took in the test process."""
    import moto.backends

    if getattr(moto.backends.list_of_moto_modules, "_faceattr_once", False):
        return
    names = tuple(moto.backends.list_of_moto_modules())

    def listed():
        return iter(names)

    listed._faceattr_once = True
    moto.backends.list_of_moto_modules = listed


def _atomic_conditional_puts() -> None:
    """Make moto's conditional PutObject (``If-None-Match: *``, ``If-Match``) atomic, as S3's is. moto checks
    the condition and then stores the object (moto/s3/responses.py, ``put_object``) without a lock, and its
    server answers each request in a thread of its own: under load two creates of one key could both pass the
    check. Seen once (2026-12-03, a full suite): two of six runs racing for a stale label lease on S3 both
    "won" (tests/test_lease.py), which S3 itself never lets happen. The lock covers only conditional writes."""
    import threading

    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_faceattr_atomic", False):
        return
    plain, lock = S3Response.put_object, threading.Lock()

    def put_object(self):
        if self.headers.get("If-None-Match") or self.headers.get("If-Match"):
            with lock:
                return plain(self)
        return plain(self)

    put_object._faceattr_atomic = True
    S3Response.put_object = put_object


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields ``(boto3 client, bucket name)``."""
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"test-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    yield client, name


@pytest.fixture(scope="session")
def group_photo() -> tuple[bytes, int]:
    """A 900x640 JPEG photo holding 3 faces of different sizes (one turned) over clutter: real UTKFace faces
    from ../shared/data when present (their points found by the detector), else drawn faces (their drawn
    points). Returns ``(bytes, faces)``."""
    import io

    import numpy as np
    from PIL import Image

    from facedata.compose import FaceSource, background, paste

    sources = []
    real = sorted((SHARED_DATA / "utkface").glob("*.jpg"))[:3] if SHARED_DATA.is_dir() else []
    if real:
        from faces.detect import FaceDetector

        det = FaceDetector()
        for p in real:
            img = np.asarray(Image.open(p).convert("RGB"))
            f = det.detect([torch.from_numpy(img.copy()).permute(2, 0, 1)])[0]
            sources.append(FaceSource(img, f.boxes[0].numpy(), f.points[0].numpy()))
    else:
        from tests.images import drawn_source

        sources = [drawn_source(i, stream=3)[0] for i in range(3)]
    canvas = background(np.random.default_rng(7), 900, 640)
    for src, centre, width, angle in zip(sources, [(180, 200), (520, 330), (780, 160)], (180, 130, 90), (0, 15, -10)):
        paste(canvas, src, centre, width, angle)
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), len(sources)


# --- checkpoints and the detector, made once per session ----------------------------------------------------
@pytest.fixture(scope="session")
def hs_checkpoint(tmp_path_factory) -> str:
    """A hard_sharing checkpoint (50 px grey input, the quickest model)."""
    from tests.helpers import save_model

    return save_model(str(tmp_path_factory.mktemp("hs") / "hard_sharing.pt"), "hard_sharing", seed=7)


@pytest.fixture(scope="session")
def three(tmp_path_factory) -> dict[str, str]:
    """Three checkpoints of different architectures, inputs and face templates (a model set's members):
    hard_sharing (50 px grey), dmm_cnn (ResNet-18 trunk, 64 px) and age_gender_race (dlib's face trunk,
    150 px, the embedding's chip)."""
    from tests.helpers import save_model

    d = tmp_path_factory.mktemp("set")
    torch.manual_seed(0)
    return {name: save_model(str(d / f"{name}.pt"), name, **kw)
            for name, kw in (("hard_sharing", {}), ("dmm_cnn", {"depth": 18, "image_size": 64}),
                             ("age_gender_race", {}))}


@pytest.fixture(scope="session")
def finder():
    """The face detector with its default settings (faces.finder.FaceFinder), on the CPU."""
    from faces.finder import FaceFinder

    return FaceFinder()


@pytest.fixture(scope="session")
def hs_annotator(hs_checkpoint):
    """``core.annotator.Annotator`` of hs_checkpoint on the CPU in fp32: the core every job and route runs."""
    from core.annotator import Annotator

    return Annotator(hs_checkpoint, device="cpu", precision="fp32", threads=2)
