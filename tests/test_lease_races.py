"""Races in the label job's output lease (raytasks/label/lease.py) found by the lease audit, each forced by
wrapping the store's write so that another run acts at the worst moment, on a local folder and on a real S3
endpoint (moto's server): generation numbers reused after a clean release, a renewal's check-then-write
bringing back a taken-over lease, the "holder died on this host" shortcut across pid namespaces, and a
create answered "exists" although it was made (NFS's retransmitted LINK, S3's resent PutObject)."""

from __future__ import annotations

import json
import os
import time

import pytest

from raytasks.label import lease as L
from raytasks.label.lease import Lease, LeaseHeld, LeaseLost
from raytasks.label.lease_store import _gen_name, _generations, _Store
from tests.helpers import lease_output

output = pytest.fixture(params=["local", "s3"])(lease_output)


def fenced(fence) -> bool:
    try:
        fence.check()
    except LeaseLost:
        return True
    return False


@pytest.fixture
def stale(output):
    """Makes a run that took the output and then stalled past its expiry (no renewal thread, never released)."""
    def make(ttl_s: float = 0.3) -> Lease:
        lease = Lease(output, ttl_s=ttl_s, renew=False).acquire()
        time.sleep(ttl_s + 0.1)
        return lease
    return make


def before_write(store, action):
    """Run ``action`` once, right before the store's next write, as if the writer stalled just before it.
    The write wrapped is the one a renewal makes: ``create`` (and ``put``, the overwrite renewal used before
    generations became write-once, so that the test reproduces the race on that code too)."""
    done = []

    def wrap(real):
        def write(*args, **kwargs):
            if not done:
                done.append(action())
            return real(*args, **kwargs)
        return write

    for name in ("put", "create"):
        if hasattr(store, name):
            setattr(store, name, wrap(getattr(store, name)))
    return done


# -- 1. generation numbers are never reused ----------------------------------------------------------------
def test_a_clean_release_does_not_give_its_generation_number_to_the_next_run(output):
    a = Lease(output, renew=False).acquire()
    first = a.gen
    a.release()
    b = Lease(output, renew=False).acquire()  # released: taken at once, with a new number
    assert b.gen > first
    assert Lease(output).holder()["owner"] == b.owner
    b.release()
    assert Lease(output).holder() is None


def test_a_stalled_run_cannot_take_back_a_lease_released_and_taken_again(output, stale):
    a = stale()
    b = Lease(output, ttl_s=30, renew=False).acquire()
    b_gen = b.gen
    b.release()  # the folder no longer empties: the next run cannot land on a's number
    c = Lease(output, ttl_s=30, renew=False).acquire()
    assert c.gen > b_gen > a.gen
    for _ in range(2):  # a's renewal thread wakes, and keeps trying; c keeps renewing
        assert a.renew() is False and a.lost
        assert fenced(a.fence()) and not fenced(c.fence())
        assert c.renew()
        assert fenced(a.fence()) and not fenced(c.fence())
    assert Lease(output).holder()["owner"] == c.owner
    c.release()


def test_renewal_refuses_a_generation_that_is_not_its_own(output, stale):
    """Even when a's number comes round again (someone emptied _lease/), a's renewal does not write over the
    run that holds that number now."""
    a = stale()
    for g in _generations(a.store):
        a.store.delete(_gen_name(g))
    c = Lease(output, ttl_s=30, renew=False).acquire()
    assert c.gen == a.gen
    assert a.renew() is False and a.lost
    assert Lease(output).holder()["owner"] == c.owner and not fenced(c.fence())
    c.release()


def test_a_fence_that_saw_another_runs_generation_never_passes_again(output, stale):
    a = stale()
    fence = a.fence()
    b = Lease(output, ttl_s=30, renew=False).acquire()
    assert fenced(fence)
    # b's generation vanishes from the listing and a's record is back, unexpired: a listing that lags, a
    # restored backup; the fence has seen b's generation and still refuses
    a.store.delete(_gen_name(b.gen))
    a.ttl_s = 30
    assert a.store.create(_gen_name(a.gen), a._record())
    assert fenced(fence)


# -- 2. a renewal stalled between its check and its write ------------------------------------------------
@pytest.mark.parametrize("successor_renews", [False, True], ids=["taken-over", "taken-over-and-renewed"])
def test_a_renewal_stalled_before_its_write_cannot_bring_back_a_taken_over_lease(output, stale, successor_renews):
    """a passes its renewal's check, stalls; b takes the output over (and, in the second case, renews, which
    deletes the generation numbers below its own, a's next one included); then a's write lands."""
    a = stale()
    fence = a.fence()
    runs = {}

    def take_over():
        runs["b"] = b = Lease(output, ttl_s=30, renew=False).acquire()
        if successor_renews:
            assert b.renew()

    took = before_write(a.store, take_over)
    a.ttl_s = 30  # a's late record, if it counted, would hold the output for 30 s
    assert a.renew() is False and a.lost
    assert took, "the takeover did not run inside a's renewal"
    b = runs["b"]
    assert fenced(fence) and not fenced(b.fence())
    assert Lease(output).holder()["owner"] == b.owner
    assert a.renew() is False
    b.release()
    assert fenced(fence)  # b is gone: a's late write must not make a the holder again
    d = Lease(output, ttl_s=30, renew=False).acquire()  # not refused by a's late record
    assert not fenced(d.fence()) and fenced(fence)
    d.release()


def test_a_takeover_stalled_before_its_create_does_not_land_below_the_new_holder(output, stale):
    """c reads a's expired lease and stalls before creating the next generation; d takes over meanwhile and
    renews (its number and a's deleted); c's create lands in the freed number, below d's: c is refused."""
    stale()
    c = Lease(output, ttl_s=30, renew=False)
    runs = {}

    def take_over():
        runs["d"] = d = Lease(output, ttl_s=30, renew=False).acquire()
        assert d.renew()

    before_write(c.store, take_over)
    with pytest.raises(LeaseHeld) as e:
        c.acquire()
    d = runs["d"]
    assert e.value.holder["owner"] == d.owner
    assert Lease(output).holder()["owner"] == d.owner and not fenced(d.fence())
    assert _generations(d.store) == [d.gen]  # c's create was undone
    d.release()


def test_release_after_a_takeover_leaves_the_successor_and_reports_the_loss(output, stale):
    a = stale()
    b = Lease(output, ttl_s=30, renew=False).acquire()
    a.release()
    assert a.lost  # raytasks/label/job.py reports a run that lost its lease
    assert Lease(output).holder()["owner"] == b.owner and not fenced(b.fence())
    b.release()


# -- 3. the "holder died on this host" shortcut, across pid namespaces -----------------------------------
def absent_pid() -> int:
    return next(p for p in range(4_000_000, 4_194_304) if not os.path.exists(f"/proc/{p}"))


@pytest.mark.parametrize("as_seen", [
    {"pidns": "pid:[1]"},  # another container on this host (host networking: same host name), own pids
    {"boot_id": "00000000-0000-0000-0000-000000000000"},  # another machine of the same name
    {"pidns": None, "boot_id": None},  # a holder that could not read them: judged by its expiry
    {},  # control: this machine and pid namespace, the pid gone: taken over at once
], ids=["other-pid-namespace", "other-boot", "identity-unknown", "same-namespace-control"])
def test_a_holder_whose_pid_is_gone_is_taken_over_early_only_within_this_pid_namespace(tmp_path, as_seen):
    if L._machine() is None:
        pytest.skip("this process cannot read its boot id and pid namespace: the shortcut is never taken")
    out = str(tmp_path / "out")
    a = Lease(out, ttl_s=120, renew=False).acquire()
    name = _gen_name(a.gen)
    rec = {**json.loads(a.store.get(name)), "pid": absent_pid(), "pid_start": 1, **as_seen}
    a.store.delete(name)
    assert a.store.create(name, json.dumps(rec).encode())  # the live holder's record, as written over there
    b = Lease(out, ttl_s=120, renew=False)
    if as_seen:
        with pytest.raises(LeaseHeld):  # unexpired for 2 minutes: wait for it
            b.acquire()
        assert Lease(out).holder()["owner"] == a.owner
    else:
        b.acquire()
        assert b.gen > a.gen
        b.release()


# -- 4. a create answered "exists" although it was made ----------------------------------------------------
def test_a_link_made_but_answered_eexist_counts_as_created(tmp_path, monkeypatch):
    """NFS: the reply to LINK is lost, the client sends it again, the server answers EEXIST."""
    real = os.link

    def retransmitted(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        raise FileExistsError(17, "File exists", dst)

    out = str(tmp_path / "out")
    monkeypatch.setattr(os, "link", retransmitted)
    lease = Lease(out, renew=False).acquire()  # not refused by its own record
    assert Lease(out).holder()["owner"] == lease.owner
    assert not [n for n in os.listdir(tmp_path / "out" / "_lease") if n.startswith(".tmp-")]
    monkeypatch.setattr(os, "link", real)
    lease.release()
    store = _Store(str(tmp_path / "other"))  # a name that truly exists is still refused
    assert store.create("x.json", b"1") and not store.create("x.json", b"2") and store.get("x.json") == b"1"


def test_an_s3_put_stored_but_answered_412_on_its_resend_counts_as_created(s3_bucket):
    """S3: botocore sends a put again when its reply was lost; the resend finds the object and gets 412."""
    client, bucket = s3_bucket
    out = f"s3://{bucket}/labels/run-1/"
    lease = Lease(out, renew=False)
    real = lease.store.client.put_object

    def resent(**kwargs):
        real(**kwargs)
        return real(**kwargs)  # raises ClientError 412 for a conditional create

    lease.store.client.put_object = resent
    lease.acquire()
    assert Lease(out).holder()["owner"] == lease.owner
    lease.release()
    store = _Store(f"s3://{bucket}/other/")  # someone else's object is still refused
    assert store.create("x.json", b"1") and not store.create("x.json", b"2") and store.get("x.json") == b"1"
