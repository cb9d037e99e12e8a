"""Issue 25, memory and start-up: the converted-model cache (bit-exact round trip, invalidation), a KV cache whose
untouched pages stay out of RSS and read as zeros, and the start-up path importing nothing it does not need.
Nothing here is timed (benchmarks/bench_startup.py measures)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jisu.loader import converted_cache
from jisu.loader.gguf import load_gguf
from jisu.loader.resolve import load_checkpoint
from jisu.quant.formats import QuantizedTensor
from jisu.runner.kv_cache import KVCache, untouched_zeros

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """jisu's cache folder in tmp_path, every GGUF file cached whatever its size; the folder of entries."""
    monkeypatch.setenv("JISU_CACHE_DIR", str(tmp_path / "jisu-cache"))
    monkeypatch.delenv(converted_cache.ENV_SWITCH, raising=False)
    monkeypatch.setattr(converted_cache, "MIN_FILE_BYTES", 0)
    return tmp_path / "jisu-cache" / "converted"


@pytest.fixture(scope="module")
def tiny_q_gguf(tiny_llama_dir, tmp_path_factory):
    from tiny_models import write_gguf_from_hf

    return write_gguf_from_hf(tiny_llama_dir, tmp_path_factory.mktemp("q41") / "tiny-q4_1.gguf", "Q4_1")


def assert_same_checkpoint(a, b) -> None:
    assert a.config == b.config
    assert a.metadata == b.metadata
    assert a.source == b.source
    assert list(a.tensors) == list(b.tensors)
    for name, x in a.tensors.items():
        y = b.tensors[name]
        assert type(x) is type(y), name
        if isinstance(x, QuantizedTensor):
            assert (x.bits, x.group_size, x.origin, x.fidelity) == (y.bits, y.group_size, y.origin, y.fidelity)
            for part in ("qweight", "scales", "zeros", "outlier_cols", "outlier_weights"):
                u, v = getattr(x, part), getattr(y, part)
                assert (u is None) == (v is None), (name, part)
                if u is not None:
                    assert u.dtype == v.dtype and torch.equal(u, v), (name, part)
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    ta, tb = a.tokenizer, b.tokenizer
    assert (ta.bos_token_id, ta.eos_token_ids, ta.add_bos_token, ta.add_eos_token, ta.chat_template,
            ta.special_tokens) == (tb.bos_token_id, tb.eos_token_ids, tb.add_bos_token, tb.add_eos_token,
                                   tb.chat_template, tb.special_tokens)
    for text in ("Hello world", "def f(x):\n    return 12345 + x  # ü 中文 🙂", "  two  spaces\t\n\n"):
        assert ta.tokenizer.encode(text).ids == tb.tokenizer.encode(text).ids


def test_cache_round_trips_bit_exactly(cache, tiny_q_gguf):
    direct = load_gguf(tiny_q_gguf, keep_blocks=True)
    first = load_checkpoint(str(tiny_q_gguf), keep_blocks=True)  # converted, stored
    entries = list(cache.glob("*.jisu"))
    assert len(entries) == 1
    hit = load_checkpoint(str(tiny_q_gguf), keep_blocks=True)
    assert any(isinstance(t, QuantizedTensor) for t in hit.tensors.values())
    assert_same_checkpoint(direct, first)
    assert_same_checkpoint(direct, hit)


def test_real_model_round_trips_and_generates_the_same(cache, real_model_path):
    from jisu import LLM, SamplingParams

    direct = load_gguf(real_model_path, keep_blocks=True)
    load_checkpoint(str(real_model_path), keep_blocks=True)
    hit = load_checkpoint(str(real_model_path), keep_blocks=True)
    assert_same_checkpoint(direct, hit)
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    want = [o.token_ids for o in LLM(checkpoint=direct, max_model_len=256).generate(prompts, params)]
    got = [o.token_ids for o in LLM(checkpoint=hit, max_model_len=256).generate(prompts, params)]
    assert got == want


def test_cache_is_invalidated_when_the_file_changes(cache, tiny_llama_dir, tmp_path, monkeypatch):
    from tiny_models import write_gguf_from_hf

    path = write_gguf_from_hf(tiny_llama_dir, tmp_path / "model.gguf", "Q8_0")
    load_checkpoint(str(path), keep_blocks=True)
    converted = []
    real = converted_cache.read_entry
    monkeypatch.setattr(converted_cache, "read_entry", lambda *a: converted.append(1) or real(*a))
    hit = load_checkpoint(str(path), keep_blocks=True)
    assert_same_checkpoint(load_gguf(path, keep_blocks=True), hit)

    # Another file at the same path (other numbers, other format): the entry is stale and replaced.
    write_gguf_from_hf(tiny_llama_dir, path, "Q4_1")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # even on a coarse-mtime file system
    changed = load_checkpoint(str(path), keep_blocks=True)
    assert_same_checkpoint(load_gguf(path, keep_blocks=True), changed)
    assert {t.origin for t in changed.tensors.values() if isinstance(t, QuantizedTensor)} == {"Q4_1"}
    assert len(list(cache.glob("*.jisu"))) == 1  # one entry per path
    assert_same_checkpoint(changed, load_checkpoint(str(path), keep_blocks=True))


def test_key_covers_the_code_that_converts(cache, tiny_q_gguf, monkeypatch):
    load_checkpoint(str(tiny_q_gguf), keep_blocks=True)
    key = converted_cache._source_key(tiny_q_gguf)
    entry = converted_cache.entry_path(tiny_q_gguf)
    assert converted_cache.read_entry(entry, key, str(tiny_q_gguf)) is not None
    assert converted_cache.read_entry(entry, {**key, "code": "other"}, str(tiny_q_gguf)) is None
    assert converted_cache.read_entry(entry, {**key, "format": key["format"] + 1}, str(tiny_q_gguf)) is None


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "empty"])
def test_damaged_entry_is_ignored_and_rewritten(cache, tiny_q_gguf, damage):
    load_checkpoint(str(tiny_q_gguf), keep_blocks=True)
    entry = converted_cache.entry_path(tiny_q_gguf)
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) - 4096 - 1])
    elif damage == "garble_header":
        entry.write_bytes(data[:20] + b"\xff" * 40 + data[60:])
    else:
        entry.write_bytes(b"")
    again = load_checkpoint(str(tiny_q_gguf), keep_blocks=True)
    assert_same_checkpoint(load_gguf(tiny_q_gguf, keep_blocks=True), again)
    assert entry.read_bytes() == data  # rewritten whole


def test_cache_can_be_turned_off(cache, tiny_q_gguf, monkeypatch):
    monkeypatch.setenv(converted_cache.ENV_SWITCH, "0")
    load_checkpoint(str(tiny_q_gguf), keep_blocks=True)
    assert not cache.exists() or not list(cache.glob("*.jisu"))


def test_unwritable_cache_folder_still_loads(tmp_path, tiny_q_gguf, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("JISU_CACHE_DIR", str(blocker))
    monkeypatch.setattr(converted_cache, "MIN_FILE_BYTES", 0)
    assert_same_checkpoint(load_gguf(tiny_q_gguf, keep_blocks=True),
                           load_checkpoint(str(tiny_q_gguf), keep_blocks=True))


# ----------------------------------------------------------------------------- the KV cache


def _mappings_rss_kb() -> dict[tuple[int, int], int]:
    """Resident KB of every mapping of this process, by address range (Linux's /proc/self/smaps)."""
    out, current = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                current = tuple(int(x, 16) for x in head.split("-"))
            elif current is not None and head == "Rss:":
                out[current] = int(line.split()[1])
    return out


def _resident_kb(*tensors: torch.Tensor) -> int:
    """Resident KB of the mappings holding these tensors' data, each mapping counted once: the kernel merges
    adjacent anonymous mappings with the same flags (the KV cache's layers), so one mapping can hold several."""
    maps = _mappings_rss_kb()
    found = set()
    for t in tensors:
        addr = t.data_ptr()
        hit = [r for r in maps if r[0] <= addr < r[1]]
        assert hit, "mapping not found"
        found.add(hit[0])
    return sum(maps[r] for r in found)


linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")


@linux_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_pages_are_zero_and_not_resident_until_written(dtype):
    shape = (16 * 4096, 2, 64)  # 16 MiB as float32
    t = untouched_zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert _resident_kb(t) == 0
    # Read everything (as attention reads slots past a sequence's end): finite zeros, still nothing resident.
    assert torch.isfinite(t).all() and not t.any()
    assert _resident_kb(t) <= 4
    t[:32] = 1.0  # two blocks of 16 slots
    row_kb = 2 * 64 * t.element_size() / 1024
    assert _resident_kb(t) <= math.ceil(32 * row_kb / 4) * 4 + 8
    assert float(t[32:].abs().sum()) == 0.0 and bool((t[:32] == 1).all())


@linux_only
def test_engine_kv_cache_grows_with_use(tiny_llama_dir):
    from jisu import LLM, SamplingParams

    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory_bytes=256 << 20, max_model_len=128)
    cache = llm.engine.kv_cache
    allocated = sum(k.nbytes + v.nbytes for k, v in cache.layers)
    assert allocated >= 4 << 20  # far beyond what one short request uses
    tensors = [t for layer in cache.layers for t in layer]
    # Growth, not the total: the kernel merges adjacent mappings with the same flags, so another live engine's
    # cache (a session fixture's) can share the mapping and bring its own resident pages (seen once in a full run).
    before = _resident_kb(*tensors) * 1024
    llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=8))
    assert _resident_kb(*tensors) * 1024 - before < allocated / 20


def test_kv_cache_on_cpu_is_zero_whatever_the_allocator_held():
    from jisu.models.config import ModelConfig

    # Fill and free memory of the cache's size first: recycled allocator memory must not show through.
    junk = torch.full((1 << 20,), float("nan"))
    del junk
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=128)
    cache = KVCache(config, num_blocks=64, block_size=16, dtype=torch.float32, device="cpu")
    for k, v in cache.layers:
        assert k.shape == (1024, 2, 32) and not k.any() and not v.any()


# ----------------------------------------------------------------------------- what start-up imports


def _modules_after(code: str, env: dict | None = None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True)
    return set(out.stdout.strip().splitlines()[-1].split())


def test_import_jisu_is_light():
    mods = _modules_after("import jisu")
    assert "torch" not in mods


def test_loading_a_model_imports_no_compiler_stack(tiny_llama_gguf):
    # torch._dynamo came in through meta-device init ops (1-2 s); cpp_extension / setuptools through the kernels'
    # build check once they are built; the server and transformers have no business in a generate.
    mods = _modules_after(f"from jisu import LLM, SamplingParams\n"
                          f"LLM(model={str(tiny_llama_gguf)!r}).generate(['Hi'], SamplingParams(max_tokens=2))")
    for name in ("torch._dynamo", "sympy", "transformers", "fastapi", "uvicorn"):
        assert name not in mods, name
    if "jisu.kernels.build" in mods:  # the kernels were used; built by now, so found without the build machinery
        assert "setuptools" not in mods and "torch.utils.cpp_extension" not in mods


def test_cache_hit_does_not_parse_the_gguf(tiny_q_gguf, tmp_path):
    env = {"JISU_CACHE_DIR": str(tmp_path / "c")}
    code = ("from jisu.loader import converted_cache as c; c.MIN_FILE_BYTES = 0\n"
            f"from jisu.loader.resolve import load_checkpoint; load_checkpoint({str(tiny_q_gguf)!r}, keep_blocks=True)")
    assert "gguf" in _modules_after(code, env)  # a miss reads the file with gguf's reader
    assert "gguf" not in _modules_after(code, env)  # a hit does not


def test_memory_report_of_an_engine(tiny_llama_dir):
    from jisu import LLM, SamplingParams
    from jisu.profile.memory import format_bytes, memory_report

    llm = LLM(model=str(tiny_llama_dir), max_model_len=128)
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4))
    m = memory_report(llm.engine)
    kv = m["kv_cache"]
    assert kv["allocated_bytes"] == sum(k.nbytes + v.nbytes for k, v in llm.engine.kv_cache.layers)
    assert m["peak_rss_bytes"] > 0
    if m["rss_bytes"] is not None:
        assert 0 < kv["resident_bytes"] <= kv["allocated_bytes"] and m["rss_bytes"] <= m["peak_rss_bytes"]
    assert format_bytes(3 << 20) == "3 MiB" and format_bytes(None) == "-"


def test_compare_report_names_what_its_memory_figures_mean():
    from jisu.bench.compare import format_compare

    result = {"engines": {"jisu": {"medians": {}, "load_rss_growth_bytes": 100 << 20}}, "input_len": 8,
              "runs": 1, "model": "m", "concurrency": [1], "skipped": {}, "calibration_source": "none",
              "peak_rss_bytes": 500 << 20, "checkpoint_rss_bytes": 300 << 20}
    text = format_compare(result)
    assert "process peak RSS 500 MiB" in text and "jisu +100 MiB at load" in text


def test_cli_start_up_freezes_what_it_made_and_leaves_the_collector_on(tiny_llama_gguf):
    # startup_gc.py: torch's import and the model's objects go to gc's permanent generation, so a later full
    # collection (during a decode, or a server's request) walks only what was made after them.
    code = ("import gc\nfrom jisu.cli import build_parser, load_llm\n"
            f"llm = load_llm(build_parser().parse_args(['generate', 'hi', '--model', {str(tiny_llama_gguf)!r}]), "
            "quiet=True)\n"
            "print(gc.isenabled(), gc.get_freeze_count(), len(gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    enabled, frozen, tracked = out.stdout.split()
    assert enabled == "True"
    assert int(frozen) > 50_000 and int(tracked) < int(frozen) / 10, (frozen, tracked)


def test_collector_is_back_on_when_the_imports_fail():
    import gc

    from jisu.startup_gc import imports_frozen

    try:
        with pytest.raises(ModuleNotFoundError):
            with imports_frozen():
                import jisu_no_such_module  # noqa: F401
        assert gc.isenabled()
    finally:
        gc.unfreeze()  # this test process is pytest's: give its objects back to the collector
