"""Calibration (quick mode), its cache, the CPU clock, and cycle counting."""

from __future__ import annotations

import json
import time

import pytest
import torch

from jisu.errors import InvalidRequestError
from jisu.profile import calibrate as cal_mod
from jisu.profile import cycles
from jisu.profile.calibrate import (
    Calibration,
    cache_path,
    calibrate,
    fingerprint,
    load_calibration,
    read_cpu_clock,
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibration")
    return directory, calibrate(quick=True, directory=directory)


def test_quick_figures_are_positive_and_plausible(quick):
    _, cal = quick
    # Any machine that runs jisu reads memory at 0.5 GB/s - 10 TB/s and multiplies float32 at 0.1 - 10^5 GFLOP/s.
    assert 0.5e9 < cal.bandwidth_bytes_per_s < 1e13
    assert cal.bandwidth_best_bytes_per_s >= cal.bandwidth_bytes_per_s
    assert 1e8 < cal.peak_flops_per_s["float32"] < 1e14
    assert all(rate > 0 for rate in cal.peak_flops_per_s.values())
    assert cal.threads == torch.get_num_threads() and cal.quick
    assert cal.device == "cpu" and cal.fingerprint == fingerprint("cpu")


def test_cache_is_written_and_read_back_without_measuring(quick, monkeypatch):
    directory, cal = quick
    path = cache_path(cal.fingerprint, directory)
    assert path.is_file() and cal.path == str(path)
    stored = json.loads(path.read_text())
    assert stored["bandwidth_bytes_per_s"] == cal.bandwidth_bytes_per_s and "path" not in stored

    def no_measuring(*a, **k):
        raise AssertionError("measured although a cached calibration exists")

    monkeypatch.setattr(cal_mod, "measure", no_measuring)
    again = calibrate(quick=True, directory=directory)
    assert again == cal
    assert load_calibration(directory=directory) == cal


def _fake(quick: bool, fp: str) -> Calibration:
    return Calibration(
        device="cpu", device_name="fake", threads=1, bandwidth_bytes_per_s=1e9, peak_flops_per_s={"float32": 1e9},
        matmul_n={"float32": 256}, clock_hz=1e9, clock_source="test", cpu_model="fake", cpu_count=1,
        torch_version=torch.__version__, fingerprint=fp, quick=quick, measured_at="now",
    )


def test_new_fingerprint_force_or_full_request_measure_again(tmp_path, monkeypatch):
    calls = []

    def fake_measure(device="cpu", quick=False):
        calls.append(quick)
        return _fake(quick, cal_mod.fingerprint(device))

    monkeypatch.setattr(cal_mod, "measure", fake_measure)
    calibrate(quick=True, directory=tmp_path)
    calibrate(quick=True, directory=tmp_path)  # cached
    assert calls == [True]
    calibrate(quick=True, directory=tmp_path, force=True)  # --force
    assert calls == [True, True]
    calibrate(quick=False, directory=tmp_path)  # only quick figures cached: a full run measures
    assert calls == [True, True, False]
    calibrate(quick=True, directory=tmp_path)  # full figures satisfy a quick request
    assert calls == [True, True, False]
    monkeypatch.setattr(cal_mod, "fingerprint", lambda device="cpu", threads=None: "another-machine")
    fresh = calibrate(quick=True, directory=tmp_path)  # another machine / torch build: nothing cached
    assert calls == [True, True, False, True] and fresh.fingerprint == "another-machine"
    assert cache_path("another-machine", tmp_path).is_file()


def test_corrupt_cache_is_measured_again(tmp_path, monkeypatch):
    path = cache_path(fingerprint(), tmp_path)
    path.write_text("{not json")
    assert load_calibration(directory=tmp_path) is None
    monkeypatch.setattr(cal_mod, "measure", lambda device="cpu", quick=False: _fake(quick, fingerprint()))
    assert calibrate(quick=True, directory=tmp_path).device_name == "fake"
    assert json.loads(path.read_text())["device_name"] == "fake"


def test_cpu_clock_says_where_it_came_from():
    hz, source = read_cpu_clock()
    if hz is None:
        assert source.startswith("unknown")
    else:
        assert 2e8 < hz < 1e10 and ("/proc/cpuinfo" in source or "/sys/" in source)


def test_missing_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidRequestError, match="no CUDA GPU"):
        cal_mod.measure("cuda", quick=True)


# ----------------------------------------------------------------------------- cycles


def test_counter_status_gives_a_reason_when_unavailable():
    status = cycles.counter_status()
    assert status.available or status.reason


def test_thread_counters_plumbing_with_a_software_event():
    # The task-clock software event exists even where no hardware PMU does: it checks the perf_event_open call,
    # the per-thread fds and the ioctls against the CPU time the OS reports.
    try:
        counter = cycles.ThreadCounters(cycles.PERF_TYPE_SOFTWARE, cycles.PERF_COUNT_SW_TASK_CLOCK)
    except OSError as e:
        pytest.skip(f"perf_event_open unavailable: {e}")
    a = torch.randn(512, 512)
    try:
        counter.start()
        cpu0 = time.process_time()
        for _ in range(30):
            a @ a
        cpu = time.process_time() - cpu0
        ns = counter.stop()
    finally:
        counter.close()
    assert ns / 1e9 == pytest.approx(cpu, rel=0.25, abs=0.01)


def test_count_cycles_labels_estimates():
    result, c = cycles.count_cycles(lambda: sum(range(200_000)), clock_hz=2e9)
    assert result == sum(range(200_000))
    if c.source == "perf_event":
        assert c.cycles > 0 and c.instructions > 0
    else:
        assert c.estimated and "estimated" in c.note
        assert c.cycles == pytest.approx(c.cpu_s * 2e9)
    assert c.per_token(4) == pytest.approx(c.cycles / 4)
    assert c.flops_per_cycle(2 * c.cycles) == pytest.approx(2.0)
    with pytest.raises(InvalidRequestError):
        c.per_token(0)
