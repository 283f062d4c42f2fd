"""OtherLoad: the share of the machine's cores that other processes kept busy during a block of work."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sparse_nlp.lm.machine_load import OtherLoad, is_quiet

SPIN = "import time\nend = time.perf_counter() + {seconds}\nwhile time.perf_counter() < end: pass\n"


@pytest.mark.skipif(not os.path.isfile("/proc/stat"), reason="reads Linux /proc/stat")
def test_busy_processes_beside_a_sleeping_one_are_seen():
    spinners = min(os.cpu_count() or 1, 2)
    with OtherLoad() as load:
        workers = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=1.5)]) for _ in range(spinners)]
        time.sleep(1.0)  # this process does nothing meanwhile
    for worker in workers:
        worker.wait()
    assert load.share is not None and load.share > 0.5 * spinners / os.cpu_count()
    assert is_quiet(load.share) is False


def test_own_work_is_not_counted_as_others(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1000 0 500 90000 10 0 0 0 0 0\n")
    with OtherLoad(str(stat)) as load:
        sum(i * i for i in range(300_000))  # own CPU time; the fake machine counter does not move
    assert load.share == 0.0 and is_quiet(load.share) is True


def test_no_proc_stat_means_unknown(tmp_path):
    with OtherLoad(str(tmp_path / "missing")) as load:
        pass
    assert load.share is None and is_quiet(load.share) is None
