"""Shared checks for every architecture: a tiny random model built by transformers' own classes (its
save_pretrained writes the folder), jisu's logits against transformers' on the same weights, and the engine's
invariants (batch == single, chunked prefill, prefix cache, preemption) on it.

An architecture's test builds its transformers config (odd sizes, GQA, tied or not), calls `save_tiny_hf`, and
optionally writes a GGUF of it the way llama.cpp's converter would, then calls `assert_logits_match` and
`assert_engine_invariants` on each.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import _tokenizer_config, tiny_tokenizer  # noqa: F401  (also sets HF_HUB_OFFLINE)

DECODE_STEPS = 16
GREEDY_STEPS = 12


def tiny_vocab(kind: str = "llama") -> tuple[int, int | None, int]:
    """(vocab size, bos id, eos id) of the tiny trained tokenizer `save_tiny_hf` writes."""
    tok = tiny_tokenizer(kind)
    cfg = _tokenizer_config(kind, tok)
    bos = tok.token_to_id(cfg["bos_token"]) if cfg.get("bos_token") else None
    return tok.get_vocab_size(with_added_tokens=True), bos, tok.token_to_id(cfg["eos_token"])


def save_tiny_hf(model_cls, config, folder: str | Path, seed: int = 0, kind: str = "llama",
                 perturb_norms: bool = True) -> Path:
    """Builds `model_cls(config)` with transformers' random init (seeded), nudges norm weights and biases off their
    init values (so a loader that swaps or drops one is caught), saves it with save_pretrained and writes the tiny
    tokenizer beside it. config.vocab_size must be tiny_vocab(kind)[0]. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if perturb_norms and (("norm" in name or "ln_" in name) or name.endswith(".bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tok = tiny_tokenizer(kind)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(kind, tok), indent=2))
    return folder


def captured_logits(llm, prompt_ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy-generates `steps` tokens and records the logits the engine sampled from at each step."""
    from jisu import SamplingParams

    seen = []
    runner = llm.engine.runner
    original = runner.execute

    def spy(step):
        logits = original(step)
        seen.append(logits.clone())
        return logits

    runner.execute = spy
    try:
        out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))[0]
    finally:
        runner.execute = original
    return out.token_ids, [s[0] for s in seen]


def reference_logits(hf_dir, ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_close_relative(mine: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    err = (mine - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} exceeds {rel} x max |logit| {scale:.3g}"


def prompt_ids(n: int = 11, seed: int = 1, high: int = 200) -> list[int]:
    return [int(t) for t in torch.randint(3, high, (n,), generator=torch.Generator().manual_seed(seed))]


def assert_logits_match(path, hf_dir, prompt: list[int] | None = None, steps: int = DECODE_STEPS, what: str = "",
                        **llm_kwargs) -> None:
    """jisu's logits for `path` (the folder itself, or a GGUF written from it) equal transformers' on `hf_dir` within
    1e-4 relative at the prefill and `steps` decode steps. Small KV blocks so the steps cross block boundaries."""
    from jisu import LLM

    llm_kwargs = {"block_size": 4, "num_kv_blocks": 64, **llm_kwargs}
    llm = LLM(model=str(path), **llm_kwargs)
    prompt = prompt or prompt_ids()
    tokens, logits = captured_logits(llm, prompt, steps)
    assert len(logits) == steps
    ref = reference_logits(hf_dir, prompt + tokens)
    for i, got in enumerate(logits):
        assert_close_relative(got, ref[len(prompt) - 1 + i], f"{what or path} step {i}")


def _greedy(llm, prompts: list[list[int]]) -> list[list[int]]:
    from jisu import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=GREEDY_STEPS, ignore_eos=True)
    return [llm.generate([p], params)[0].token_ids for p in prompts]


def _assert_no_leak(llm) -> None:
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()


def assert_engine_invariants(path, prompt_len: int = 40, **llm_kwargs) -> None:
    """On one model: a batch of prompts equals each alone; chunked prefill, prefix-cache hits and preemption under
    a tiny KV budget all keep the greedy output. prompt_len: make it longer than a sliding window to test it."""
    from jisu import LLM, SamplingParams

    shared = prompt_ids(prompt_len, seed=7)
    prompts = [shared + [3 + i, 9 + i] for i in range(4)] + [prompt_ids(9, seed=11)]
    cold = LLM(model=str(path), block_size=4, enable_prefix_caching=False, **llm_kwargs)
    expected = _greedy(cold, prompts)
    params = SamplingParams(temperature=0, max_tokens=GREEDY_STEPS, ignore_eos=True)
    batched = [o.token_ids for o in cold.generate(prompts, params)]
    assert batched == expected, "a batch differs from each prompt alone"
    chunked = LLM(model=str(path), block_size=4, enable_prefix_caching=False, max_num_batched_tokens=7,
                  **llm_kwargs)
    assert [o.token_ids for o in chunked.generate(prompts, params)] == expected, "chunked prefill changed output"
    warm = LLM(model=str(path), block_size=4, **llm_kwargs)
    assert _greedy(warm, prompts) == expected, "prefix-cache hits changed output"
    assert warm.engine.blocks.prefix_cache_hits > 0
    need = -(-(prompt_len + 2 + GREEDY_STEPS) // 4)
    small = LLM(model=str(path), block_size=4, num_kv_blocks=need + 2, enable_prefix_caching=False, **llm_kwargs)
    assert [o.token_ids for o in small.generate(prompts, params)] == expected, "preemption changed output"
    assert small.engine.scheduler.total_preemptions > 0
    for llm in (cold, chunked, warm, small):
        _assert_no_leak(llm)


def tiny_gemma3(tie: bool = True, window: int = 6):
    """(transformers class, config) of a tiny Gemma 3: sliding and full layers, two RoPE tables (the global one
    scaled), a query scalar that is not head_dim."""
    import transformers

    _, bos, eos = tiny_vocab("llama")
    c = transformers.Gemma3TextConfig(
        vocab_size=tiny_vocab("llama")[0], hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=3, num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, tie_word_embeddings=tie, bos_token_id=bos, eos_token_id=eos,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
    )
    c.architectures = ["Gemma3ForCausalLM"]
    return transformers.Gemma3ForCausalLM, c
