"""`jisu profile`, `jisu calibrate` and `jisu estimate` end to end on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def jisu(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", JISU_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "jisu.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_profile_reports_every_section_and_writes_trace_and_plots(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    cal = jisu("calibrate", "--quick", "--json", cache=cache)
    assert cal.returncode == 0, cal.stderr
    proc = jisu("profile", "--model", str(tiny_llama_dir), "--prompts", "3", "--input-len", "20", "--output-len", "6",
                "--json", "--trace", str(tmp_path / "t.json"), "--plot", str(tmp_path / "png"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["requests"]["requests"] == 3 and report["requests"]["completion_tokens"] == 18
    assert report["profiler"]["outputs_identical_with_profiler_off"] is True
    ops = report["operators_seconds"]
    assert {"attention", "linear", "norm", "rotary", "activation", "embedding/output", "sampling", "other"} <= set(ops)
    assert all(v >= 0 for v in ops.values()) and ops["linear"] > 0 and ops["attention"] > 0
    assert len(report["layers_seconds"]) == 2
    for phase in ("prefill", "decode"):
        v = report["phases"][phase]["roofline"]
        assert v["binding"] in ("memory bandwidth", "compute") and 0 < v["percent_of_bound"]
    assert report["cycles"]["cycles_per_token"] > 0
    mem = report["memory"]
    assert mem["peak_rss_bytes"] > 0 and mem["kv_cache"]["allocated_bytes"] > 0
    if mem["rss_bytes"] is not None:  # Linux: the KV cache's written pages are a part of it
        assert 0 < mem["kv_cache"]["resident_bytes"] <= mem["kv_cache"]["allocated_bytes"]
        assert mem["rss_bytes"] <= mem["peak_rss_bytes"]
    trace = json.loads((tmp_path / "t.json").read_text())
    assert any(e["name"] == "forward" for e in trace["traceEvents"])
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert pngs == ["operators.png", "requests_gantt.png", "roofline.png", "step_phases.png"]
    assert all((tmp_path / "png" / p).stat().st_size > 5000 for p in pngs)


def test_profile_estimate_does_not_load_and_bad_paths_are_clean_errors(tiny_llama_gguf, tmp_path):
    proc = jisu("profile", "--estimate", "--model", str(tiny_llama_gguf), "--json", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    assert est["kv_bytes_per_token"] > 0
    blocked = tmp_path / "file"
    blocked.write_text("x")
    bad = jisu("profile", "--model", str(tiny_llama_gguf), "--output-len", "2", "--input-len", "4",
               "--trace", str(blocked / "t.json"), cache=tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
