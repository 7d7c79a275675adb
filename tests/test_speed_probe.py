"""benchmarks/speed_probe.py: the machine-speed probe runs, restores the thread count and refuses bad arguments."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import speed_probe  # noqa: E402


def test_probe_times_the_passes_and_restores_threads(capsys):
    threads = torch.get_num_threads()
    assert speed_probe.probe(passes=1, warmup=0) > 0
    assert torch.get_num_threads() == threads
    speed_probe.main(["--repeats", "2", "--passes", "1"])
    out = capsys.readouterr().out.splitlines()
    assert [line.startswith("speed probe: ") for line in out] == [True, True, False] and out[2].startswith("best: ")


def test_bad_arguments():
    with pytest.raises(ValueError, match="passes must be >= 1"):
        speed_probe.probe(passes=0)
    with pytest.raises(SystemExit):
        speed_probe.main(["--repeats", "0"])
