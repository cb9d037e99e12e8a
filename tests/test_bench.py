"""`jisu bench`: prompts, and latency / serve / compare end to end on tiny models."""

from __future__ import annotations

import json
import socket

import pytest

from jisu.bench.cli import main as bench
from jisu.bench.prompts import BUILTIN_DATASET, load_jsonl, load_tokenizer, synthetic_prompt, synthetic_prompts
from jisu.errors import InvalidRequestError


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_synthetic_prompts_have_exact_lengths(tiny_tok, length):
    ps = synthetic_prompts(tiny_tok, 3, length, seed=length)
    for p in ps:
        assert len(p.token_ids) == length
        assert tiny_tok.encode(p.text, add_special_tokens=False) == p.token_ids  # the text round-trips
    assert len({tuple(p.token_ids) for p in ps}) == 3  # different prompts, so no prefix-cache reuse


def test_synthetic_prompts_on_the_real_tokenizer(real_model_path):
    tok = load_tokenizer(real_model_path)
    for length in (16, 512):
        p = synthetic_prompt(tok, length, seed=3)
        assert len(p.token_ids) == length and tok.encode(p.text, add_special_tokens=False) == p.token_ids


def test_synthetic_prompt_rejects_bad_length(tiny_tok):
    with pytest.raises(InvalidRequestError, match="--input-len"):
        synthetic_prompt(tiny_tok, 0)


def test_builtin_dataset_has_real_prompts_of_both_kinds():
    prompts = load_jsonl(BUILTIN_DATASET)
    assert len(prompts) >= 40
    assert sum(p.is_chat for p in prompts) >= 10 and sum(not p.is_chat for p in prompts) >= 10


def test_jsonl_with_prompts_and_messages(tmp_path):
    f = tmp_path / "ok.jsonl"
    f.write_text('{"prompt": "hello", "output_len": 5}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    a, b = load_jsonl(f)
    assert a.text == "hello" and a.output_len == 5 and not a.is_chat
    assert b.is_chat and b.messages[0]["content"] == "hi"


@pytest.mark.parametrize("content, fragment", [
    ('{"prompt": "a"}\n{not json}\n', "line 2 is not valid JSON"),
    ('{"text": "a"}\n', "exactly one of"),
    ('{"prompt": "a", "messages": []}\n', "exactly one of"),
    ('{"prompt": ""}\n', "non-empty string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "messages[0]"),
    ('{"prompt": "a", "output_len": 0}\n', "output_len"),
    ('[1, 2]\n', "JSON object"),
    ("\n\n", "no prompts"),
])
def test_bad_jsonl_gives_a_clear_error(tmp_path, content, fragment):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(InvalidRequestError, match="--dataset") as e:
        load_jsonl(f)
    assert fragment in str(e.value) and str(f) in str(e.value)


def test_missing_jsonl(tmp_path):
    with pytest.raises(InvalidRequestError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- bench serve


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir):
    from jisu import LLM
    from jisu.server.app import create_app
    from jisu.server.serve import ServerThread

    llm = LLM(model=str(tiny_llama_dir))  # its own engine: the server thread drives it
    with ServerThread(create_app(llm.engine, model_name="tiny")) as url:
        yield url


SERVE_FIELDS = {"max_concurrency", "request_rate", "num_prompts", "duration", "completed", "failed",
                "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
                "output_throughput", "total_token_throughput", "errors"} | {
    f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el")}


def prefix_cache_hits(base_url: str) -> float:
    import httpx

    lines = httpx.get(base_url + "/metrics").text.splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith("jisu:prefix_cache_hits"))


def test_bench_serve_writes_every_field(tiny_server, tiny_llama_dir, tmp_path):
    out = tmp_path / "serve.json"
    hits = prefix_cache_hits(tiny_server)
    rc = bench(["bench", "serve", "--base-url", tiny_server, "--tokenizer", str(tiny_llama_dir),
                "--concurrency", "1,4", "--num-prompts", "8", "--input-len", "24", "--output-len", "6",
                "--goodput", "ttft:60000", "tpot:60000", "--json", str(out), "--plot", str(tmp_path / "plots")])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and [lv["max_concurrency"] for lv in result["levels"]] == [1, 4]
    for lv in result["levels"]:
        assert SERVE_FIELDS <= set(lv), SERVE_FIELDS - set(lv)
        assert lv["completed"] == 8 and lv["failed"] == 0 and lv["errors"] == []
        assert lv["total_output_tokens"] == 8 * 6  # from usage; ignore_eos makes every length exact
        assert lv["total_input_tokens"] == 8 * 25  # 24 synthetic tokens + the BOS the server adds
        assert lv["request_goodput"] == pytest.approx(lv["request_throughput"])  # generous SLOs: all good
        assert 0 < lv["median_ttft_ms"] <= lv["p99_ttft_ms"] and lv["mean_tpot_ms"] > 0
        assert lv["output_throughput"] == pytest.approx(48 / lv["duration"])
    # Each level sent fresh prompts: the second did not find the first's in the server's prefix cache.
    assert prefix_cache_hits(tiny_server) == hits
    assert (tmp_path / "plots" / "throughput_vs_concurrency.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "latency_vs_concurrency.png").stat().st_size > 1000


def test_bench_serve_chat_dataset_with_poisson_arrivals(tiny_server, tiny_llama_dir, tmp_path):
    out = tmp_path / "chat.json"
    rc = bench(["bench", "serve", "--base-url", tiny_server, "--tokenizer", str(tiny_llama_dir),
                "--dataset", "builtin", "--concurrency", "2", "--num-prompts", "6", "--output-len", "4",
                "--request-rate", "50", "--percentiles", "50,90", "--json", str(out)])
    assert rc == 0
    lv = json.loads(out.read_text())["levels"][0]
    assert lv["completed"] == 6 and lv["failed"] == 0 and lv["total_output_tokens"] == 24
    assert "p90_itl_ms" in lv and "p99_itl_ms" not in lv


def test_bench_serve_counts_failures(tiny_server, tiny_llama_dir, tmp_path):
    # One prompt longer than the tiny model's 256-token context: the server answers 400, the run goes on.
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                            ["hello world", "the quick brown fox", "python function", "word " * 400]))
    out = tmp_path / "fail.json"
    rc = bench(["bench", "serve", "--base-url", tiny_server, "--tokenizer", str(tiny_llama_dir), "--dataset",
                str(data), "--concurrency", "2", "--num-prompts", "4", "--output-len", "4", "--json", str(out)])
    lv = json.loads(out.read_text())["levels"][0]
    assert rc == 0 and lv["completed"] == 3 and lv["failed"] == 1 and "HTTP 400" in lv["errors"][0]
    assert lv["total_output_tokens"] == 12


def test_bench_serve_stops_when_the_warm_up_fails(tiny_server, tiny_llama_dir, capsys):
    rc = bench(["bench", "serve", "--base-url", tiny_server, "--tokenizer", str(tiny_llama_dir),
                "--model", "no-such-model", "--num-prompts", "2", "--input-len", "8"])
    err = capsys.readouterr().err
    assert rc == 1 and "warm-up request failed" in err and "no-such-model" in err


def test_bench_serve_unreachable_server(tiny_llama_dir, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = bench(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", str(tiny_llama_dir)])
    assert rc == 1 and "--base-url" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--concurrency", "1,x"], "--concurrency"), (["--concurrency", "0"], "--concurrency"),
    (["--request-rate", "-2"], "--request-rate"), (["--goodput", "ttft=1"], "--goodput"),
    (["--num-prompts", "0"], "--num-prompts"), (["--base-url", "127.0.0.1:8000"], "--base-url"),
])
def test_bench_serve_bad_flags(args, fragment, capsys):
    base = ["bench", "serve", "--base-url", "http://127.0.0.1:9"]
    assert bench(base + args) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


# ----------------------------------------------------------------------------- bench latency


def test_bench_latency_json_is_sane(tiny_llama_dir, tmp_path):
    out = tmp_path / "lat.json"
    assert bench(["bench", "latency", "--model", str(tiny_llama_dir), "--input-len", "32", "--output-len", "8",
                  "--runs", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["input_len"], r["output_len"], r["batch"], r["runs"]) == (32, 8, 1, 2)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "e2e_s"):
        s = r["results"][key]
        assert len(s["values"]) == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    assert r["results"]["ttft_s"]["max"] < r["results"]["e2e_s"]["max"]
    assert r["peak_memory_bytes"] > 10 * 2**20 and r["cached_prompt_tokens_per_run"] == [0, 0]


def test_bench_latency_depth_and_batch(tiny_llama_dir, tmp_path):
    out = tmp_path / "depth.json"
    assert bench(["bench", "latency", "--model", str(tiny_llama_dir), "--input-len", "16", "--output-len", "4",
                  "--batch", "2", "--depth", "32", "--runs", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # Both prompts found the 32 depth tokens (two full 16-token blocks) in the prefix cache.
    assert r["depth"] == 32 and r["cached_prompt_tokens_per_run"] == [64]
    assert r["results"]["decode_tokens_per_s"]["median"] > 0


def test_bench_latency_needs_two_output_tokens(tiny_llama_dir, capsys):
    assert bench(["bench", "latency", "--model", str(tiny_llama_dir), "--output-len", "1"]) == 1
    assert "--output-len must be an integer >= 2" in capsys.readouterr().err


def test_bench_latency_context_too_long(tiny_llama_dir, capsys):
    assert bench(["bench", "latency", "--model", str(tiny_llama_dir), "--input-len", "200", "--depth", "100"]) == 1
    err = capsys.readouterr().err
    assert "--depth" in err and "context window" in err


# ----------------------------------------------------------------------------- bench compare


def test_bench_compare_reports_skipped_engines(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JISU_CACHE_DIR", str(tmp_path / "cache"))  # a quick calibration, not the user's cache
    out = tmp_path / "cmp.json"
    rc = bench(["bench", "compare", "--model", str(tiny_llama_dir), "--engines", "jisu,transformers,llama.cpp",
                "--input-len", "32", "--output-len", "8", "--runs", "2", "--concurrency", "1,3",
                "--calibration", "quick", "--json", str(out), "--plot", str(tmp_path / "plots")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["engines"]) == {"jisu", "transformers"}
    # llama.cpp cannot run a Hugging Face folder; when it is not installed at all, the note says how to get it.
    skip = r["skipped"]["llama.cpp"]
    assert "GGUF" in skip["reason"] or skip["install"] == "pip install llama-cpp-python"
    for name, e in r["engines"].items():
        m = e["medians"]
        assert m["prefill_tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0
        assert m["concurrent_3_output_tokens_per_s"] > 0 and len(e["runs"]["decode_tokens_per_s"]) == 2
        roof = e["roofline"]
        assert roof["decode"]["percent"] > 0 and roof["prefill"]["percent"] > 0 and roof["concurrent_3"]["percent"] > 0
    ratio = r["ratios_vs_jisu"]["transformers"]["decode_tokens_per_s"]
    assert ratio == pytest.approx(r["engines"]["transformers"]["medians"]["decode_tokens_per_s"]
                                  / r["engines"]["jisu"]["medians"]["decode_tokens_per_s"])
    paired = r["paired_ratios_vs_jisu"]["transformers"]["decode_tokens_per_s"]
    assert paired["pairs"] == 2 and paired["min"] <= paired["median"] <= paired["max"]
    assert "skipped: llama.cpp" in capsys.readouterr().out
    assert (tmp_path / "plots" / "compare.png").stat().st_size > 1000


def test_paired_ratios_divide_within_each_run():
    from jisu.bench.compare import format_compare, paired_ratios_vs_jisu

    # Run 2 is slow for both engines: the ratio of medians (10/100) differs from every run's own ratio.
    results = {"jisu": {"runs": {"decode_tokens_per_s": [100.0, 50.0, 200.0], "ttft_s": [0.1, 0.2, 0.1]}},
               "other": {"runs": {"decode_tokens_per_s": [30.0, 10.0, None], "ttft_s": [0.3, 0.4, 0.5]}}}
    paired = paired_ratios_vs_jisu(results)
    assert paired == {"other": {"decode_tokens_per_s": {"median": 0.25, "min": 0.2, "max": 0.3, "pairs": 2}}}
    text = format_compare({"runs": 3, "model": "m", "input_len": 8, "concurrency": [1], "skipped": {},
                           "calibration_source": "none",
                           "engines": {n: {"medians": {"decode_tokens_per_s": 1.0}} for n in results},
                           "ratios_vs_jisu": {"other": {"decode_tokens_per_s": 0.25}},
                           "paired_ratios_vs_jisu": paired})
    assert "within each run: decode 0.20-0.30x (median 0.25x)" in text
    assert paired_ratios_vs_jisu({"other": results["other"]}) == {}  # nothing to divide by without jisu


def test_bench_compare_llama_cpp_on_gguf(tiny_llama_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "cmp.json"
    assert bench(["bench", "compare", "--model", str(tiny_llama_gguf), "--engines", "jisu,llama.cpp",
                  "--input-len", "32", "--output-len", "8", "--runs", "1", "--concurrency", "1,2",
                  "--calibration", "none", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["engines"]) == {"jisu", "llama.cpp"} and r["engines"]["llama.cpp"]["medians"]["decode_tokens_per_s"] > 0
    assert "back to back" in r["engines"]["llama.cpp"]["note"]


def test_bench_compare_unknown_engine(capsys):
    assert bench(["bench", "compare", "--engines", "jisu,vllm"]) == 1
    assert "--engines" in capsys.readouterr().err
    assert bench(["bench", "compare", "--engines", "transformers:int4"]) == 1
    assert "jisu:WEIGHTS" in capsys.readouterr().err
    assert bench(["bench", "compare", "--engines", "jisu:int3"]) == 1
    assert "int3" in capsys.readouterr().err


def test_bench_compare_jisu_weight_formats_side_by_side(tiny_llama_dir, tmp_path):
    out = tmp_path / "cmp.json"
    assert bench(["bench", "compare", "--model", str(tiny_llama_dir), "--engines", "jisu,jisu:int4,jisu:int4",
                  "--input-len", "32", "--output-len", "8", "--runs", "1", "--concurrency", "1",
                  "--calibration", "none", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["engines"]) == ["jisu", "jisu:int4"]  # a repeated engine runs once
    assert r["engines"]["jisu:int4"]["medians"]["decode_tokens_per_s"] > 0
    assert set(r["ratios_vs_jisu"]) == {"jisu:int4"}


def test_bench_compare_no_deterministic_reaches_jisu(tiny_llama_dir, tmp_path, monkeypatch):
    """--no-deterministic builds jisu's engines with deterministic=False (prompts on the eager layers) and says so."""
    from jisu.llm import LLM

    made = []
    real_init = LLM.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs.get("deterministic", True))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(LLM, "__init__", spy)
    out = tmp_path / "cmp.json"
    assert bench(["bench", "compare", "--model", str(tiny_llama_dir), "--engines", "jisu", "--no-deterministic",
                  "--input-len", "32", "--output-len", "4", "--runs", "1", "--concurrency", "1",
                  "--calibration", "none", "--json", str(out)]) == 0
    assert made == [False]
    assert "not deterministic" in json.loads(out.read_text())["engines"]["jisu"]["note"]


def test_bench_compare_int8_activations_reach_jisu_and_the_kernel_set_is_reported(tiny_llama_dir, tmp_path):
    out = tmp_path / "cmp.json"
    assert bench(["bench", "compare", "--model", str(tiny_llama_dir), "--engines", "jisu:int4", "--activations",
                  "int8", "--input-len", "32", "--output-len", "4", "--runs", "1", "--concurrency", "1",
                  "--calibration", "none", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "--activations int8 (changes answers" in r["engines"]["jisu:int4"]["note"]
    from jisu.kernels.build import cpu_linear_kernels

    kernels = cpu_linear_kernels()
    assert r["machine"]["cpu_kernels"] == (None if kernels is None else kernels.instruction_set)
