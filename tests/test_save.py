"""save_hf_folder: a saved model loads back identical (config, tensors, tokenizer, generation)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_tiny_hf_model, smollm2_checkpoint, write_gguf_from_hf

from jisu import LLM, SamplingParams
from jisu.errors import InvalidRequestError, ModelLoadError
from jisu.loader.resolve import load_checkpoint
from jisu.loader.save import save_checkpoint, save_hf_folder
from jisu.models.config import ModelConfig
from jisu.tokenizer import Tokenizer

TEXTS = ["the quick brown fox jumps over 12345 lazy dogs", "def f(x):\n    return x * 2\n", "über café 你好 🙂",
         "<think> hello world", "  indented   spaces"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the answer"}, {"role": "user", "content": "and again?"}]


def greedy(checkpoint, prompts=("the quick brown fox", "hello world"), n=12) -> list[list[int]]:
    llm = LLM(checkpoint=checkpoint, max_model_len=256, max_num_seqs=2)
    outs = llm.generate(list(prompts), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def assert_same_model(a, b, generate=True):
    assert b.config == a.config
    assert sorted(b.tensors) == sorted(a.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].dtype == t.dtype, name
        assert torch.equal(b.tensors[name], t), name
    ta, tb = a.tokenizer, b.tokenizer
    for field in ("bos_token_id", "eos_token_ids", "add_bos_token", "add_eos_token", "chat_template", "special_tokens"):
        assert getattr(tb, field) == getattr(ta, field), field
    tok_a, tok_b = Tokenizer(ta), Tokenizer(tb)
    for text in TEXTS:
        assert tok_b.encode(text) == tok_a.encode(text), text
        assert tok_b.encode(text, add_special_tokens=False) == tok_a.encode(text, add_special_tokens=False), text
    if ta.chat_template is not None:
        for gen_prompt in (True, False):
            assert tok_b.apply_chat_template(CHAT, gen_prompt) == tok_a.apply_chat_template(CHAT, gen_prompt)
            assert tok_b.encode_chat(CHAT, gen_prompt) == tok_a.encode_chat(CHAT, gen_prompt)
    if generate:
        assert greedy(b) == greedy(a)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("save-src")
    cases = {
        "llama": dict(arch="llama"),
        "llama-tied": dict(arch="llama", num_kv_heads=4, tie=True),
        "qwen2": dict(arch="qwen2"),
        "mistral-rope": dict(arch="mistral", num_kv_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    }
    return {name: make_tiny_hf_model(root / name, **kw) for name, kw in cases.items()}


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("case", ["llama", "llama-tied", "qwen2", "mistral-rope"])
def test_round_trip(tiny, case, fmt, tmp_path):
    src = tiny[case] if fmt == "hf" else write_gguf_from_hf(tiny[case], tmp_path / "m.gguf")
    a = load_checkpoint(src)
    out = save_checkpoint(tmp_path / "saved", a)
    b = load_checkpoint(out)
    assert_same_model(a, b, generate=case in ("llama", "qwen2"))
    cfg = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_hf_dict(cfg) == a.config  # config.json alone gives the config back
    assert cfg["head_dim"] == a.config.head_dim and cfg["torch_dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not a.config.tie_word_embeddings)


def test_saved_twice_is_stable(tiny, tmp_path):
    a = load_checkpoint(save_checkpoint(tmp_path / "one", load_checkpoint(tiny["qwen2"])))
    save_checkpoint(tmp_path / "two", a)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name


def test_transformers_reads_the_folder(tiny, tmp_path):
    """The folder is a real HF checkpoint: transformers gives jisu's ids (BOS included) and logits."""
    transformers = pytest.importorskip("transformers")
    gguf = write_gguf_from_hf(tiny["llama"], tmp_path / "m.gguf")  # q/k rows were permuted; saved in HF layout
    out = save_checkpoint(tmp_path / "saved", load_checkpoint(gguf))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(load_checkpoint(out).tokenizer)
    for text in TEXTS:
        assert tok(text).input_ids == ours.encode(text), text
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == ours.apply_chat_template(CHAT)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ours.encode(TEXTS[0])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    llm = LLM(model=str(out), max_model_len=64, max_num_seqs=1)
    got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    assert got.token_ids[0] == int(ref.argmax())
    ref_lp = torch.log_softmax(ref, -1)
    for token, lp in got.logprobs[0].top:
        assert abs(lp - ref_lp[token].item()) < 1e-4


def test_any_dtype_and_name_is_saved_as_given(tiny, tmp_path):
    ck = load_checkpoint(tiny["llama"])
    extra = {
        "model.layers.0.mlp.down_proj.qweight": torch.randint(0, 255, (64, 64), dtype=torch.uint8),
        "model.layers.0.mlp.down_proj.scales": torch.rand(64, 4).half(),
        "model.layers.0.mlp.down_proj.zeros": torch.rand(64, 4).half(),
        "model.layers.1.mlp.up_proj.qweight": torch.randint(-128, 127, (128, 64), dtype=torch.int8),
        "model.layers.1.mlp.up_proj.scales": torch.rand(128, 1).bfloat16(),
    }
    tensors = {**ck.tensors, **extra}
    meta = {"quantization": "int4", "group_size": "32"}
    qcfg = {"quantization_config": {"quant_method": "jisu", "bits": 4, "group_size": 32}}
    out = save_hf_folder(tmp_path / "q", ck.config, tensors, ck.tokenizer, metadata=meta, extra_config=qcfg)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", **meta}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == qcfg["quantization_config"]
    assert cfg["num_hidden_layers"] == ck.config.num_hidden_layers


def test_views_and_shared_storage_are_written(tiny, tmp_path):
    """Slices of one matrix and a tensor listed twice (safetensors refuses shared memory as such)."""
    ck = load_checkpoint(tiny["llama"])
    tensors = dict(ck.tensors)
    big = torch.randn(256, 64)
    tensors["model.layers.0.mlp.gate_proj.weight"] = big[:128]
    tensors["model.layers.0.mlp.up_proj.weight"] = big[128:]
    tensors["model.layers.0.mlp.down_proj.weight"] = big[:128].t()  # not contiguous
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # untied config, same storage
    out = save_hf_folder(tmp_path / "v", ck.config, tensors, ck.tokenizer)
    back = load_checkpoint(out)
    for name, t in tensors.items():
        assert torch.equal(back.tensors[name], t), name
    assert torch.equal(tensors["model.layers.0.mlp.gate_proj.weight"], big[:128])  # the input is untouched


def test_tied_output_layer_is_written_once(tiny, tmp_path):
    ck = load_checkpoint(tiny["llama-tied"])
    assert "lm_head.weight" not in ck.tensors
    tensors = {**ck.tensors, "lm_head.weight": ck.tensors["model.embed_tokens.weight"]}
    out = save_hf_folder(tmp_path / "t", ck.config, tensors, ck.tokenizer)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_bad_metadata_and_existing_folder(tiny, tmp_path):
    ck = load_checkpoint(tiny["llama"])
    with pytest.raises(InvalidRequestError, match="metadata must map strings to strings"):
        save_checkpoint(tmp_path / "m", ck, metadata={"amount": 0.5})
    assert not (tmp_path / "m").exists()
    out = save_checkpoint(tmp_path / "m", ck)
    with pytest.raises(ModelLoadError, match="already holds a model"):
        save_checkpoint(out, ck)
    # Overwriting removes what the loader would otherwise also pick up.
    (out / "chat_template.jinja").write_text("stale {{ messages }}")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (out / "notes.txt").write_text("kept")
    save_checkpoint(out, ck, overwrite=True)
    assert not (out / "chat_template.jinja").exists()
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert (out / "notes.txt").read_text() == "kept"
    assert_same_model(ck, load_checkpoint(out), generate=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        save_checkpoint(tmp_path / "file", ck)


@pytest.mark.real_model
def test_default_model_round_trip(real_model_path, tmp_path):
    ck = smollm2_checkpoint()
    out = save_checkpoint(tmp_path / "smollm2", ck, metadata={"source": str(real_model_path)})
    back = load_checkpoint(out)
    assert_same_model(ck, back, generate=False)
    prompts = ("The capital of France is", "def fibonacci(n):")
    assert greedy(back, prompts, 16) == greedy(ck, prompts, 16)
