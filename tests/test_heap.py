"""raytasks/heap.py: freed memory that glibc keeps is given back by ``trim`` (what a training worker calls every
few steps, so that its resident memory does not grow with every image it trains on, and a label actor every few
batches: tests/test_inference.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (a heap of its own): 300 MB of 1 MB arrays from the heap, freed under a chunk that stays,
# so glibc keeps them: resident until trimmed
SCRIPT = textwrap.dedent("""
    import numpy as np
    from raytasks import heap

    def anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) // 1024

    first = [np.ones(1 << 20, np.uint8) for _ in range(8)]
    del first  # freeing mapped chunks moves glibc's mmap threshold above 1 MB: the next ones come from the heap
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(300)]
    keep = np.ones(200_000, np.uint8)  # above them: the heap's top cannot shrink past it
    held = anon_mb()
    del blocks
    freed = anon_mb()
    released = heap.trim()
    print(held, freed, anon_mb(), released)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc: Linux only")
def test_trim_gives_freed_heap_memory_back():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    held, freed, trimmed, released = out.stdout.split()
    held, freed, trimmed = int(held), int(freed), int(trimmed)
    assert held >= 300 and freed >= held - 20  # freed, yet still resident: what the training worker met
    assert released == "True" and trimmed <= freed - 250
