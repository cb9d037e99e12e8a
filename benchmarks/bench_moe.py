"""Batch-1 decode of a mixture-of-experts model (jisu/models/moe.py) with random weights, shaped like one of
Qwen3-30B-A3B's layers (hidden 2048, 32 q / 4 kv heads of 128, 128 experts of 768, top-8) but with few layers
and a small vocabulary, its matrices int4 (group 32) or int8 (group 32) blocks built directly (no float copy).

Reported, medians of several runs:
  - decode tok/s through the engine (LLM.generate, greedy, one sequence; prefill subtracted)
  - bytes of weights a token reads: the routed experts' (k of E per layer), everything else's (attention, router,
    norms, output layer), and what all E experts would be
  - achieved GB/s = active expert bytes per token x tok/s, and = all bytes read per token x tok/s
  - one MoE layer at one token: its time from Python, next to its 16 expert products (8 x gate_up, down) called
    back to back on the kernels: the floor that routing, activations and sums add to
  - what the real model's 48 MoE layers alone would take at the measured per-layer time (attention and the output
    layer excluded)

Run on a quiet machine (each line says how busy other processes kept the CPUs):

    .venv/bin/python benchmarks/bench_moe.py [--layers 4] [--bits 4] [--tokens 32] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_qlinear import measured
from jisu.models.config import ModelConfig
from jisu.quant.formats import QuantizedTensor

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 4, 128
EXPERTS, TOP_K, MOE_INTER = 128, 8, 768
REAL_LAYERS = 48  # Qwen3-30B-A3B
VOCAB = 8192  # not 151936: the output layer would dominate what a few layers read


def model_config(layers: int) -> ModelConfig:
    return ModelConfig.from_hf_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": 6144, "moe_intermediate_size": MOE_INTER, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": True,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    })


def random_blocks(bits: int, n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    """A random int8 / int4 matrix with group 32, scaled so activations stay O(1) through the layers."""
    g = 32
    scales = (torch.rand(n, k // g, generator=gen) * (2.0 / k**0.5) / (127 if bits == 8 else 7.5)).half()
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        return QuantizedTensor(8, q, scales, None, g, "int8")
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    return QuantizedTensor(4, q, scales, (scales.float() * -7.5).half(), g, "int4")


def random_tensors(config: ModelConfig, bits: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, qd, kvd = HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    t: dict = {
        "model.embed_tokens.weight": torch.randn(VOCAB, h, generator=gen) * 0.02,
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": random_blocks(8, VOCAB, h, gen),
    }
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        t |= {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
              p + "self_attn.q_norm.weight": torch.ones(HEAD_DIM), p + "self_attn.k_norm.weight": torch.ones(HEAD_DIM),
              p + "mlp.gate.weight": torch.randn(EXPERTS, h, generator=gen) * h**-0.5}
        for name, rows, cols in (("q_proj", qd, h), ("k_proj", kvd, h), ("v_proj", kvd, h), ("o_proj", h, qd)):
            t[f"{p}self_attn.{name}.weight"] = random_blocks(bits, rows, cols, gen)
        for e in range(EXPERTS):
            for name, rows, cols in (("gate_proj", MOE_INTER, h), ("up_proj", MOE_INTER, h),
                                     ("down_proj", h, MOE_INTER)):
                t[f"{p}mlp.experts.{e}.{name}.weight"] = random_blocks(bits, rows, cols, gen)
    return t


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from jisu.loader.checkpoint import TokenizerSpec

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    return TokenizerSpec(tokenizer=tok, bos_token_id=None, eos_token_ids=(), add_bos_token=False)


def nbytes(t) -> int:
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()


def bytes_per_token(tensors: dict) -> tuple[int, int, int]:
    """(routed experts' bytes, all experts' bytes, everything else's bytes) read by one decode token."""
    experts = sum(nbytes(v) for k, v in tensors.items() if ".experts." in k)
    other = sum(nbytes(v) for k, v in tensors.items() if ".experts." not in k and k != "model.embed_tokens.weight")
    other += HIDDEN * 4  # the one embedding row looked up
    return experts * TOP_K // EXPERTS, experts, other


def decode_seconds(llm, prompt: list[int], tokens: int) -> float:
    """Seconds per decoded token: generate(1 + tokens) minus generate(1) (the prefill and first token)."""
    from jisu import SamplingParams

    def run(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t0

    return (run(1 + tokens) - run(1)) / tokens


def layer_timings(model, repeats: int) -> tuple[float, float]:
    """(one MoE layer at one token from Python, its k experts' products called back to back), microseconds.
    Inputs cycle through `repeats` random tokens, each routed to its own experts, so that (as in decode) the
    weights come from memory, not from a cache warmed by the previous repeat."""
    moe = model.model.layers[0].mlp
    ks = moe.gate.kernels
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, HIDDEN, generator=gen) for _ in range(repeats)]
    h = torch.randn(1, MOE_INTER)
    with torch.inference_mode():
        chosen = [[moe.experts[e] for e in moe.route(x)[1][0].tolist()] for x in xs]

        def whole(i: int):
            moe(xs[i])

        def products(i: int):
            for ex in chosen[i]:
                ks.qlinear(xs[i], ex.gate_up_proj.kernel_weight)
                ks.qlinear(h, ex.down_proj.kernel_weight)

        out = []
        for fn in (whole, products):
            fn(0)
            times = []
            for i in range(repeats):
                t0 = time.perf_counter()
                fn(i)
                times.append(time.perf_counter() - t0)
            out.append(statistics.median(times) * 1e6)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--retries", type=int, default=3, help="re-runs of a measurement while others keep the CPUs busy")
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for an idle machine per try")
    args = ap.parse_args()

    from jisu import LLM
    from jisu.loader.checkpoint import Checkpoint

    config = model_config(args.layers)
    t0 = time.perf_counter()
    tensors = random_tensors(config, args.bits)
    active, all_experts, other = bytes_per_token(tensors)
    ckpt = Checkpoint(config=config, tensors=tensors, tokenizer=tiny_tokenizer(), source="random MoE")
    llm = LLM(checkpoint=ckpt, max_model_len=512, num_kv_blocks=64, block_size=16)
    del ckpt, tensors
    print(f"{args.layers} layers of hidden {HIDDEN}, {EXPERTS} experts x {MOE_INTER}, top-{TOP_K}, int{args.bits} "
          f"group 32 (output layer int8 g32, vocab {VOCAB}); built in {time.perf_counter() - t0:.0f} s, "
          f"{torch.get_num_threads()} threads")

    prompt = list(range(3, 11))
    decode_seconds(llm, prompt, args.tokens)  # warm up: first touches of the weights and the KV cache
    per_token = []
    for _ in range(args.runs):
        s, load = measured(lambda: decode_seconds(llm, prompt, args.tokens), args.retries, args.max_wait)
        per_token.append(s)
        print(f"  run: {1 / s:6.1f} tok/s{load.tag()}")
    s = statistics.median(per_token)
    tps = 1 / s
    mb = 1e6
    print(f"decode, batch 1: {tps:.1f} tok/s ({s * 1e3:.2f} ms/token, median of {args.runs})")
    print(f"bytes per token: routed experts {active / mb:.1f} MB, everything else {other / mb:.1f} MB; "
          f"all {EXPERTS} experts would be {all_experts / mb:.1f} MB ({all_experts / active:.0f}x the routed)")
    print(f"achieved: {active * tps / 1e9:.2f} GB/s of routed expert weights, "
          f"{(active + other) * tps / 1e9:.2f} GB/s of all weights read")
    (whole, products), load = measured(lambda: layer_timings(llm.engine.model, 50), args.retries, args.max_wait)
    layer_bytes = active / args.layers
    print(f"one MoE layer, 1 token: {whole:.0f} us from Python; its {2 * TOP_K} expert products back to back "
          f"{products:.0f} us ({layer_bytes / products / 1e3:.2f} GB/s); routing, activations, sums "
          f"{whole - products:.0f} us{load.tag()}")
    real, real_ms = layer_bytes * REAL_LAYERS, whole * REAL_LAYERS / 1e3
    print(f"Qwen3-30B-A3B ({REAL_LAYERS} layers): {real / mb:.0f} MB of routed experts per token; its MoE layers "
          f"alone, {whole / 1e3:.2f} ms each as measured, take {real_ms:.0f} ms -> at most {1e3 / real_ms:.1f} tok/s "
          f"(attention and output layer not counted)")

if __name__ == "__main__":
    main()
