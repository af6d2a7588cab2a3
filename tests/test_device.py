"""Tests of cvdd.device: per-phase peak memory (RSS on the CPU, the run's own GPU on CUDA)."""

from __future__ import annotations

import sys

import pytest
import torch

from cvdd.device import PhasePeaks, peak_rss_mib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-phase RSS needs /proc/self/clear_refs")
def test_phase_peaks_reset_between_phases() -> None:
    peaks = PhasePeaks("cpu")
    assert peaks.per_phase
    peaks.mark("start")
    big = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched (ones), so resident
    assert float(big[-1]) == 1.0
    peaks.mark("big")
    del big  # a large block goes back to the kernel at once (mmap)
    peaks.mark("release")  # this phase began with the block resident: its peak still holds it
    peaks.mark("small")  # this one began without it
    assert peaks.peaks["big"] >= peaks.peaks["start"] + 200
    assert peaks.peaks["small"] <= peaks.peaks["big"] - 200
    assert peaks.process == peaks.peaks["big"]
    assert peak_rss_mib() >= peaks.peaks["small"] - 1  # the kernel's mark restarted from the current RSS


class _FakeCuda:
    """Stands in for torch.cuda's memory counters on a machine without a GPU: records which device is asked."""

    def __init__(self) -> None:
        self.read: list[object] = []
        self.reset: list[object] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self._max)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset.append)

    def _max(self, device: object = None) -> int:
        self.read.append(device)
        return 3 * 2**30  # 3 GiB


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cuda:1", torch.device("cuda:1")),
        (torch.device("cuda", 2), torch.device("cuda:2")),
        (None, None),
        ("auto", None),
        ("cuda", torch.device("cuda")),
    ],
)
def test_phase_peaks_read_the_runs_gpu(monkeypatch: pytest.MonkeyPatch, device: object, expected: object) -> None:
    fake = _FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.delenv("CVDD_DEVICE", raising=False)
    peaks = PhasePeaks(device)  # type: ignore[arg-type]
    peaks.mark("recover")
    # The run's device, not the current one (cuda:0 for a single process given --device cuda:1).
    # reset when the peaks start (the first phase's peak is its own) and at the phase's end
    assert fake.read == [expected] and fake.reset == [expected, expected]
    assert peaks.peaks["recover_gpu"] == 3 * 1024
    assert peaks.process == peaks.peaks["recover"]  # the process RSS peak leaves the GPU reading out


def test_phase_peaks_follow_cvdd_device_and_ignore_invalid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setenv("CVDD_DEVICE", "cuda:3")
    PhasePeaks(None).mark("a")
    PhasePeaks("auto").mark("b")
    PhasePeaks("gpu").mark("c")  # invalid: resolve_device refuses it in one line elsewhere; no traceback here
    assert fake.read == [torch.device("cuda:3"), torch.device("cuda:3"), None]


def test_phase_peaks_cpu_run_reads_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCuda()
    fake.install(monkeypatch)
    peaks = PhasePeaks("cpu")
    peaks.mark("evaluate")
    assert fake.read == [] and "evaluate_gpu" not in peaks.peaks


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch) -> None:
    import torch

    from cvdd.device import resolve_device
    from cvdd.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"'cuda:3' requested but this machine has 1 GPU\(s\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0").index == 0
