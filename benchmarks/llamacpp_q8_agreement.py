"""How much llama.cpp's own 8-bit format moves the default model's answers: an external yardstick for jisu's
int8 quality gate (top-1 agreement >= 98% against float32, issue 5).

Writes the default model's weights (GGUF Q4_1 / Q8_0 blocks, dequantized exactly) as an F32 GGUF with jisu's
GGUF writer, has llama.cpp quantize that file to Q8_0 (llama_model_quantize, as `llama-quantize ... Q8_0`
does), then runs both files in llama.cpp over the llama-perplexity chunks of wikitext-2 (context 512, the
second half of each chunk scored) and reports Q8_0's top-1 agreement and mean KL divergence against F32, plus
F32's agreement with jisu's float32 run of the same weights (the check that both engines see one model).

    .venv/bin/python benchmarks/llamacpp_q8_agreement.py [--chunks 20] [--threads 2] [--keep DIR]

Needs llama-cpp-python (pip install llama-cpp-python) and ~700 MB of scratch disk. WikiText-2 (CC BY-SA 3.0)
from ../shared/data/wikitext-2-raw-test.txt.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path

import numpy as np
import torch

from jisu.eval.perplexity import make_chunks, read_text, scored_rows, tokenize
from jisu.eval.scoring import score_batch
from jisu.llm import LLM
from jisu.loader.resolve import load_checkpoint
from jisu.quant.formats import QuantizedTensor
from jisu.quant.gguf_out import write_gguf
from jisu.tokenizer import Tokenizer

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"
CTX = 512
LLAMA_FTYPE_MOSTLY_Q8_0 = 7


def llamacpp_logits(llama_cpp, path: Path, chunks, rows, threads: int) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    out = []
    for c in chunks:
        llm.reset()
        llm.eval(list(c))
        out.append(torch.from_numpy(np.array(llm.scores[:CTX])[rows]).float())
    return torch.cat(out)


def compare(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement in %, mean KL(ref || other)) over rows of logits."""
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return 100 * (ref.argmax(-1) == other.argmax(-1)).double().mean().item(), kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="folder for the F32 / Q8_0 GGUF files (default: a temporary one)")
    args = ap.parse_args()
    import llama_cpp

    ck = load_checkpoint(None, keep_blocks=True)
    chunks = make_chunks(tokenize(Tokenizer(ck.tokenizer), read_text(TEXT)), CTX, args.chunks).chunks
    rows = scored_rows(CTX)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        f32, q8 = folder / "model-f32.gguf", folder / "model-q8_0.gguf"
        floats = {n: t.dequantize() if isinstance(t, QuantizedTensor) else t for n, t in ck.tensors.items()}
        write_gguf(ck.source, f32, floats, ck.config, bits=8)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = args.threads
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(q8).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed with {rc}")
        ref = llamacpp_logits(llama_cpp, f32, chunks, rows, args.threads)
        q8_logits = llamacpp_logits(llama_cpp, q8, chunks, rows, args.threads)

    torch.set_num_threads(args.threads)
    jisu = LLM(weights="float32", max_model_len=CTX, max_num_seqs=1, max_num_batched_tokens=2 * CTX,
               enable_prefix_caching=False)
    ours = torch.cat([score_batch(jisu.engine, [c])[0][rows] for c in chunks])

    print(f"default model, {args.chunks} chunks of {CTX} tokens, {ref.shape[0]} scored positions, "
          f"llama-cpp-python {llama_cpp.__version__}")
    for label, (a, b) in {"llama.cpp Q8_0 vs llama.cpp F32": (ref, q8_logits),
                          "llama.cpp F32 vs jisu float32": (ours, ref)}.items():
        top1, kl = compare(a, b)
        print(f"{label:34s} top-1 {top1:6.2f}%   KL {kl:.6f}")


if __name__ == "__main__":
    main()
