"""Writes jisu/quant/data/calibration.txt: text sampled from the default model, for GPTQ's calibration.

    python tools/make_calibration_text.py            # ~2.5 min on 2 cores

Why sampled text: GPTQ needs many thousands of tokens of ordinary text to estimate each layer's input statistics,
this machine has no dataset to take them from but WikiText's test split (which the quality gates are measured on,
so it must not be used), and a model's own samples follow the distribution its activations were trained on
("data-free" calibration, as in LLM-QAT, Liu et al. 2023). The samples start from short, varied openings
(encyclopedic, narrative, code, letters, questions) and run at temperature 1, top-p 0.95, with a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

OPENINGS = [
    "The history of", "In mathematics,", "The city is located", "He was born in", "The album was released",
    "Scientists have discovered", "During the war,", "The species is found", "The game features",
    "According to the report,", "The river flows", "In 1998, the company", "The film received", "The church was built",
    "The team won", "Early life", "The theory of", "A recipe for", "The main reason", "In the nineteenth century,",
    "The novel tells", "The economy of", "Researchers at the university", "The bridge was", "The election of",
    "Climate change", "The software allows", "The museum houses", "Her career began", "The festival is held",
    "The disease causes", "The school was founded", "def main():", "Question: What is", "Dear Sir,",
    "The following table", "Once upon a time", "The court ruled", "The engine uses", "In Japanese culture,",
    "The population of", "The song reached", "The battle of", "The island is", "The king ordered",
    "Photosynthesis is", "The railway line", "The band's second album", "Water boils", "The law requires",
    "The hospital", "The temple", "Students must", "The star is", "The hurricane", "The language is spoken",
    "The ship sailed", "The painting shows", "The protein", "The tournament", "The village", "The mountain",
    "The company announced", "The poem",
]
OUT = Path(__file__).resolve().parents[1] / "jisu" / "quant" / "data" / "calibration.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: jisu's default model (SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--tokens", type=int, default=480, help="new tokens per opening")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    from jisu import LLM, SamplingParams

    llm = LLM(model=args.model, max_num_seqs=32, max_model_len=args.tokens + 64)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.tokens, seed=args.seed)
    outputs = llm.generate(OPENINGS, params)
    samples = [opening + out.outputs[0].text for opening, out in zip(OPENINGS, outputs)]
    Path(args.out).write_text("\n\n".join(s.strip() for s in samples) + "\n", encoding="utf-8")
    tokens = sum(len(out.prompt_token_ids) + len(out.outputs[0].token_ids) for out in outputs)
    print(f"wrote {args.out}: {len(samples)} samples, {tokens} tokens")


if __name__ == "__main__":
    main()
