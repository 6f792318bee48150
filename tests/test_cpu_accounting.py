"""bench/cpu_accounting.py, the per-process CPU accounting of ``bench_faces.py --cpu-accounting``: a process
that burns CPU while it is watched is charged that CPU under its own name, one that only sleeps is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cpu_accounting  # noqa: E402 - bench/ is not a package; a module that fails to import fails the test

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6:\n    pass\n"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_busy_process_is_charged_its_cpu_under_its_name(tmp_path):
    burner, sleeper = tmp_path / "burner.py", tmp_path / "sleeper.py"
    burner.write_text(BURN)
    sleeper.write_text("import time\ntime.sleep(0.8)\n")
    with cpu_accounting.ProcessCPU(interval=0.05) as acct:
        procs = [subprocess.Popen([sys.executable, str(p)]) for p in (burner, sleeper)]
        for p in procs:
            p.wait()
    # the burner used 0.6 CPU-s plus its interpreter's start; at most one poll interval of it is missed
    assert 0.45 <= acct.by_name["python burner.py"] <= 1.5, dict(acct.by_name)
    assert acct.by_name.get("python sleeper.py", 0.0) < 0.2
    assert acct.total >= acct.by_name["python burner.py"] and acct.seconds >= 0.6
    text = acct.table(per=2)
    assert "python burner.py" in text and "in all, over" in text
