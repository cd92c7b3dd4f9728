"""benchmarks/stream_path_cost.py builds AsyncLLM and CoreLink by hand (no core process) and drives the server's
stream code directly, so a change to their internals breaks it without any other test noticing (it happened
twice: the echo first-token texts, the alias table). A tiny run keeps it working."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_stream_path_cost_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stream_path_cost.py"), str(DEMO_DIR),
                          "--streams", "8", "--steps", "5", "--reps", "1"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["streams"] == 8 and figures["us_per_event_min"] > 0
