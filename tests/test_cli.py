"""The `jisu` command: output formats, and one clear message (no traceback, non-zero exit) per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def jisu(*args: str, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "jisu.cli", *args], capture_output=True, text=True, input=stdin, env=env,
        timeout=timeout,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in proc.stderr, f"{f!r} not in: {proc.stderr}"


def test_generate_json_has_the_api_fields(tiny_llama_gguf):
    proc = jisu("generate", "hello world", "--model", str(tiny_llama_gguf), "--json", "--temperature", "0",
                "--max-tokens", "5", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert set(obj) == {"text", "token_ids", "finish_reason", "metrics"}
    assert len(obj["token_ids"]) == 5 and obj["finish_reason"] == "length"
    assert obj["metrics"]["completion_tokens"] == 5 and obj["metrics"]["time_to_first_token"] > 0


def test_generate_streams_the_same_text_as_json(tiny_llama_gguf):
    common = ["hello world", "--model", str(tiny_llama_gguf), "--temperature", "0", "--max-tokens", "8", "--ignore-eos"]
    streamed = jisu("generate", *common)
    as_json = jisu("generate", *common, "--json")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip("\n") == json.loads(as_json.stdout)["text"]


def test_chat_repl_keeps_history_and_quits(tiny_llama_dir):
    proc = jisu("chat", "--model", str(tiny_llama_dir), "--temperature", "0", "--max-tokens", "4",
                stdin="hi there\n/reset\nagain\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "conversation cleared" in proc.stderr


def test_missing_model_path():
    assert_clean_error(jisu("generate", "hi", "--model", "/no/such/model.gguf"), "not found", "/no/such/model.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(300))
    assert_clean_error(jisu("generate", "hi", "--model", str(bad)), str(bad))


def test_truncated_gguf(tiny_llama_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_llama_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert_clean_error(jisu("generate", "hi", "--model", str(cut)), str(cut))


def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, copy)
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_clean_error(jisu("generate", "hi", "--model", str(copy)), weights.name)


def test_unsupported_architecture_names_the_supported_ones(tiny_llama_gguf, tmp_path):
    data = bytearray(tiny_llama_gguf.read_bytes())
    at = data.index(b"llama")  # same length, so every offset stays valid
    data[at : at + 5] = b"gpt-j"
    path = tmp_path / "gptj.gguf"
    path.write_bytes(bytes(data))
    assert_clean_error(jisu("generate", "hi", "--model", str(path)), "gpt-j", "LlamaForCausalLM", "gemma3")


def test_prompt_longer_than_context(tiny_llama_gguf):
    proc = jisu("generate", "word " * 200, "--model", str(tiny_llama_gguf), "--max-model-len", "32", "--max-tokens", "1")
    assert_clean_error(proc, "context window is 32")


def test_empty_prompt(tiny_llama_gguf):
    assert_clean_error(jisu("generate", "", "--model", str(tiny_llama_gguf)), "prompt is empty")


@pytest.mark.parametrize(
    "flag,value,field",
    [("--temperature", "-1", "temperature"), ("--top-p", "1.5", "top_p"), ("--top-k", "-5", "top_k"),
     ("--min-p", "2", "min_p"), ("--max-tokens", "-1", "max_tokens"),  # 0 is valid: the prompt only
     ("--repetition-penalty", "0", "repetition_penalty")],
)
def test_out_of_range_sampling_values_name_the_field(flag, value, field):
    # Checked before any model is loaded, so no --model is needed.
    assert_clean_error(jisu("generate", "hi", flag, value), field)


def test_cuda_without_a_gpu_is_a_clear_error(tiny_llama_gguf):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_clean_error(jisu("generate", "hi", "--model", str(tiny_llama_gguf), "--device", "cuda"), "no CUDA")


def test_generate_json_schema_file(tiny_llama_gguf, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    proc = jisu("generate", "hello", "--model", str(tiny_llama_gguf), "--json", "--temperature", "0.8", "--seed", "1",
                "--max-tokens", "40", "--json-schema", str(path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    value = json.loads(out["text"])
    assert out["finish_reason"] == "stop" and set(value) == {"ok", "n"}
    assert isinstance(value["ok"], bool) and 0 <= value["n"] <= 9


@pytest.mark.parametrize("args, fragments", [
    (["--json-schema", "/no/such/schema.json"], ["--json-schema", "cannot read", "/no/such/schema.json"]),
    (["--choice", "a", "--regex", "b"], ["give one of", "--regex, --choice"]),
    (["--regex", "(("], ["--regex", "cannot be used", "unclosed group"]),
])
def test_bad_output_constraints(tiny_llama_gguf, args, fragments):
    assert_clean_error(jisu("generate", "hi", "--model", str(tiny_llama_gguf), "--max-tokens", "8", *args), *fragments)
