"""bench/bench_http.py still runs both of its modes (its emulator set-up once broke unnoticed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_http.py"


def test_both_modes_run_and_print_every_client() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--calls", "20", "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for mode in ("keep-alive:", "connection-per-call:"):
        section = out.split(mode, 1)[1]
        assert "bare http.client" in section
        assert "gpu_router.transport" in section
