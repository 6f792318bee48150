"""How a whole S3 object is read: requests and seconds, against a real S3 endpoint on 127.0.0.1 (moto's server).

    python bench/bench_s3_read.py [--sizes 1,8,24,48,96] [--rounds 3]

Checkpoints, training states (a resume reads the model and its optimizer state), detection caches, label files
and manifests are read whole. Per object size (MB of random bytes), this times and counts the GET requests of:

* ``storage.read_bytes`` (``storage.read_all``: a random-access file, whose size is known, read in one request);
* ``storage.read_bounded`` (checkpoints: the HEAD for the size, then ranged GETs of 16 MB);
* a stream's ``read()`` with no size (``fs.open_input_stream(path).read()``, what the code did before
  2026-12-05), which pyarrow serves with one ranged GET per 256 KB.

moto's server reads the whole stored object for each ranged GET, so here the third grows with the square of the
size; against S3 each request is a round trip instead (tens of ms), so its cost grows with the number of
requests. The medians over ``--rounds`` are printed, with the GET count of one read (moto's request log).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Gets(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.n = 0

    def emit(self, record):
        self.n += "GET /bench/" in record.getMessage()  # the request line (colour codes around it)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,8,24,48,96", help="object sizes in MB, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    import storage
    from tests.helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1")
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    gets = _Gets()
    werkzeug.addHandler(gets)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")

    def stream(uri: str) -> bytes:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    ways = {"read_bytes": storage.read_bytes,
            "read_bounded": lambda uri: storage.read_bounded(uri, 1 << 31, 600),
            "stream read()": stream}
    print(f"| MB | {' | '.join(f'{w}: s (GETs)' for w in ways)} |")
    print(f"|---|{'---|' * len(ways)}")
    try:
        for mb in (int(s) for s in a.sizes.split(",")):
            data = os.urandom(mb << 20)
            uri = f"s3://bench/x{mb}"
            client.put_object(Bucket="bench", Key=f"x{mb}", Body=data)
            cells = []
            for read in ways.values():
                times = []
                for _ in range(a.rounds):
                    gets.n = 0
                    t = time.perf_counter()
                    assert read(uri) == data
                    times.append(time.perf_counter() - t)
                cells.append(f"{statistics.median(times):.2f} ({gets.n})")
            print(f"| {mb} | {' | '.join(cells)} |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
