"""ik_llama.cpp as an engine of `jisu bench compare`: its `llama-bench` ($JISU_IK_LLAMA_BENCH) run as a child
process on the same GGUF, prompt length, output length and threads, its JSON parsed into compare's figures, and
the child's own peak RSS taken through a small launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import statistics
from pathlib import Path

from jisu.bench.engine_support import EngineSkipped as _Skip
from jisu.bench.engine_support import gguf_weight_format as _gguf_weight_format
from jisu.errors import InvalidRequestError, JisuError

IK_LLAMA_ENV = "JISU_IK_LLAMA_BENCH"


def ik_llama_bench_path() -> str | None:
    """The llama-bench named by $JISU_IK_LLAMA_BENCH; None when the variable is unset or empty."""
    value = os.environ.get(IK_LLAMA_ENV, "").strip()
    if not value:
        return None
    if not os.path.isfile(value) or not os.access(value, os.X_OK):
        what = "does not exist" if not os.path.exists(value) else "is not an executable file"
        raise InvalidRequestError(f"{IK_LLAMA_ENV}={value!r} {what}; set it to ik_llama.cpp's llama-bench binary "
                                  f"(e.g. /tmp/ik_llama/build/bin/llama-bench) or unset it to skip ik_llama")
    return value


_KV_NAMES = {"f16": "float16", "f32": "float32", "bf16": "bfloat16"}  # llama-bench's type_k -> roofline's names


def parse_llama_bench_json(text: str, input_len: int, output_len: int) -> dict:
    """Figures from llama-bench's `-o json` output of one `-p P -n 0 -gp P,N-1` invocation.

    prefill tok/s = its pp test (P prompt tokens from an empty cache); decode tok/s = its tg test after the prompt
    (N-1 single-token steps at positions P..P+N-2, the same steps as compare's decode after the first token).
    llama-bench does not say when a first token would have been sampled, so TTFT and E2E are absent (None)."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise JisuError(f"ik_llama: llama-bench's output is not JSON ({e}); it began: {text[:200]!r}") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise JisuError(f"ik_llama: llama-bench's JSON is not a list of tests; it began: {text[:200]!r}")

    def rate(label: str, n_prompt: int, n_gen: int) -> tuple[float, dict]:
        found = [t for t in tests if t.get("test") == label
                 or ("test" not in t and t.get("n_prompt") == n_prompt and t.get("n_gen") == n_gen)]
        if len(found) != 1:
            raise JisuError(f"ik_llama: expected one {label} test in llama-bench's output, found {len(found)} "
                            f"(tests: {[t.get('test') for t in tests]})")
        samples = found[0].get("samples_ns") or []
        if not samples or any(not isinstance(ns, (int, float)) or ns <= 0 for ns in samples):
            raise JisuError(f"ik_llama: llama-bench's {label} test has no valid samples_ns: {samples!r}")
        tokens = n_gen if n_gen else n_prompt  # a tg@pp test times its generated tokens only
        return statistics.median(tokens * 1e9 / ns for ns in samples), found[0]

    prefill, info = rate(f"pp{input_len}", input_len, 0)
    decode = None
    if output_len > 1:
        decode, _ = rate(f"tg{output_len - 1}@pp{input_len}", input_len, output_len - 1)
    keys = ("build_commit", "build_number", "cpu_info", "model_type", "n_threads", "n_batch", "n_ubatch",
            "type_k", "type_v", "flash_attn", "repack", "use_mmap")
    return {"figures": {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "ttft_s": None,
                        "e2e_s": None},
            "config": {k: info[k] for k in keys if k in info}}


class IkLlamaEngine:
    """ik_llama.cpp, timed by its own llama-bench in a child process, once per compare run (-r 1) so that it
    takes its turn in the alternation like the in-process engines."""

    name = "ik_llama"
    kv_dtype = "float16"  # llama-bench's default; replaced by what its JSON reports
    own_process = True  # its memory is the child's peak RSS, not this process's growth
    batch = None  # llama-bench runs one sequence: no concurrent figures

    def __init__(self, path: Path, checkpoint, max_len: int, max_seqs: int, run_time_repack: bool = True,
                 timeout_s: float = 600.0):
        import torch

        del checkpoint, max_len
        binary = ik_llama_bench_path()
        if binary is None:
            raise _Skip(f"{IK_LLAMA_ENV} is not set")
        if not path.is_file():
            raise _Skip("ik_llama.cpp needs a GGUF file; the model is a Hugging Face folder")
        self.binary, self.path, self.timeout_s = binary, path, timeout_s
        self.run_time_repack = run_time_repack
        self.threads = torch.get_num_threads()  # the same threads as the torch engines
        self.version = "unknown"  # llama-bench's build, known after its first run
        self.config: dict = {}
        self.note = ("timed by llama-bench (its own timers, its own random prompt tokens): prefill = its pp test, "
                     "decode = its tg test after the prompt (-gp); no TTFT; memory = its process's peak RSS"
                     + ("; -rtr 1 (run-time repack)" if run_time_repack else "; -rtr 0")
                     + ("; no concurrent figures (one sequence)" if max_seqs > 1 else ""))

    def command(self, input_len: int, output_len: int) -> list[str]:
        cmd = [self.binary, "-m", str(self.path), "-p", str(input_len), "-n", "0", "-t", str(self.threads),
               "-r", "1", "-o", "json", "-rtr", "1" if self.run_time_repack else "0"]
        if output_len > 1:
            cmd += ["-gp", f"{input_len},{output_len - 1}"]
        return cmd

    def latency_figures(self, prompt: list[int], output_len: int) -> dict:
        cmd = self.command(len(prompt), output_len)
        out, peak_rss = run_child(cmd, self.timeout_s, what="ik_llama: llama-bench")
        parsed = parse_llama_bench_json(out, len(prompt), output_len)
        self.config = parsed["config"] | {"command": cmd}
        commit, number = self.config.get("build_commit"), self.config.get("build_number")
        if commit:
            self.version = f"{commit} (build {number})" if number is not None else str(commit)
        self.kv_dtype = _KV_NAMES.get(str(self.config.get("type_k")), self.kv_dtype)
        return parsed["figures"] | {"child_peak_rss_bytes": peak_rss}

    def weight_format(self):
        return _gguf_weight_format(self.path)


# Runs argv[2:] as its own child and writes "<ru_maxrss> <wait status>" of it to argv[1]. Why a launcher: a child
# spawned straight from this process (GBs once jisu is loaded) reports ru_maxrss >= this process's RSS, because
# Linux records the memory it shared before exec; forked from this small launcher, the peak is the command's own.
_LAUNCHER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {status}")
"""


def run_child(cmd: list[str], timeout_s: float, what: str) -> tuple[str, int | None]:
    """(stdout, peak RSS in bytes of that command's process) of a command that must exit 0 within timeout_s."""
    with tempfile.TemporaryDirectory(prefix="jisu-child-") as tmp, \
            open(Path(tmp) / "out", "w+b") as out, open(Path(tmp) / "err", "w+b") as err:  # files: no pipe to fill
        report = Path(tmp) / "rusage"
        # A session of its own, so a timeout kills the launcher and the command together.
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *cmd],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            proc.wait()
        err.seek(0)
        tail = "\n".join(err.read().decode(errors="replace").strip().splitlines()[-15:])
        shown = " ".join(cmd)
        if timed_out:
            raise JisuError(f"{what} did not finish within {timeout_s:g} s and was killed: {shown}"
                            + (f"\nits stderr ended:\n{tail}" if tail else ""))
        fields = report.read_text().split() if report.exists() else []
        if proc.returncode != 0 or len(fields) != 2:  # the launcher itself failed, e.g. no such command
            raise JisuError(f"{what} could not be run (launcher status {proc.returncode}): {shown}"
                            + (f"\nstderr ended:\n{tail}" if tail else ""))
        maxrss, status = int(fields[0]), os.waitstatus_to_exitcode(int(fields[1]))
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise JisuError(f"{what} {how}: {shown}" + (f"\nits stderr ended:\n{tail}" if tail else " (no stderr)"))
        out.seek(0)
        # ru_maxrss: KiB on Linux, bytes on macOS.
        peak = maxrss * (1 if sys.platform == "darwin" else 1024) if maxrss else None
        return out.read().decode(errors="replace"), peak


