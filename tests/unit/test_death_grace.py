"""exit_unless_noticed: after a tensor-parallel worker's death, a driver stuck where nothing raises (a collective
waiting for the dead rank) is ended by the monitor after the grace; one that notices the death, or closes, is not."""
import subprocess
import sys

SCRIPT = """
import sys, threading, time
from types import SimpleNamespace
from pagedllm.distributed import executor
executor.DEATH_GRACE_SECONDS = 1.0
ex = SimpleNamespace(closing=False, noticed=False)
threading.Thread(target=executor.exit_unless_noticed, args=(ex,), daemon=True).start()
if sys.argv[1] == "notices":
    time.sleep(0.3)
    ex.noticed = True      # a failed call saw the death: the engine ends in order
time.sleep(3)              # stuck (or ending in order): the monitor must not exit a driver that noticed
print("ran on")
"""


def run(mode: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def test_a_stuck_driver_exits_after_the_grace():
    code, out = run("stuck")
    assert code == 1 and "ran on" not in out, out   # within the 3 s that the driver stays stuck
    assert "stuck in a step with a dead tensor-parallel worker" in out, out


def test_a_driver_that_noticed_runs_on():
    code, out = run("notices")
    assert code == 0 and "ran on" in out, out
