"""Speculative decoding side by side: the same greedy requests with and without speculation, in one process,
alternating run by run, on input-quoting tasks (edits, reformatting and summaries that copy from the prompt).

Per task and configuration: decode tokens/s of the request (tokens after the first over the time between first
and last token), end-to-end seconds, and whether the text equals plain decoding's. Medians over --runs; the
acceptance rate is drafted tokens accepted over drafted tokens (vLLM's spec_decode_num_accepted_tokens /
spec_decode_num_draft_tokens).

    flock /tmp/jisu-bench.lock .venv/bin/python benchmarks/bench_spec_decode.py --runs 3
    .venv/bin/python benchmarks/bench_spec_decode.py --config '{"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 4, "prompt_lookup_min": 2}' --max-tokens 128 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from jisu import LLM, SamplingParams

PASSAGE = (
    "The city council met on Tuesday evening to discuss the proposed budget for the new public library. "
    "After a long debate, the members agreed to fund a children's reading room, to extend the opening hours "
    "on weekends, and to hire two additional librarians. The mayor said that the library would open in the "
    "spring of next year, and that the old building on Main Street would be turned into a community center."
)
CODE = (
    "def total_price(items, tax_rate):\n"
    "    total = 0\n"
    "    for item in items:\n"
    "        total = total + item.price * item.quantity\n"
    "    total = total + total * tax_rate\n"
    "    return total\n"
)
TASKS = {
    "repeat": "Repeat the following text exactly, word for word:\n\n" + PASSAGE,
    "fix-typos": "Fix the spelling mistakes in this text and write out the corrected text:\n\n"
    + PASSAGE.replace("library", "librery").replace("debate", "debait").replace("spring", "sprng"),
    "rename": "Rename the variable `total` to `amount` in this Python function and show the whole function:\n\n"
    + CODE,
    "summary": "Summarize the following text in two sentences:\n\n" + PASSAGE,
    "bullets": "Rewrite the following text as a bulleted list, one bullet per sentence:\n\n" + PASSAGE,
}
# k = 3: as fast as k = 4 at one thread with higher acceptance (docs/PERFORMANCE.md, speculative decoding); int4 rows
# of x share each widened weight block 4 at a time, so 4-row verifies are the cheapest per row.
DEFAULT_CONFIG = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def run_one(llm: LLM, prompt: str, params: SamplingParams) -> dict:
    start = time.perf_counter()
    out = llm.chat([{"role": "user", "content": prompt}], params)[0]
    m = out.metrics
    return {"text": out.text, "tokens": m.completion_tokens, "decode_tok_s": m.decode_tokens_per_s,
            "e2e_s": time.perf_counter() - start, "draft_tokens": m.spec_num_draft_tokens,
            "accepted": m.spec_num_accepted_tokens}


def row_costs(model: str | None, runs: int = 15) -> dict[int, float]:
    """Median ms of one sequence's step of 1..8 rows (ModelRunner.prepare + execute, 170-token context): what a
    verify of 1 + k rows costs against a plain decode step."""
    from jisu.request import Request
    from jisu.scheduler.scheduler import ScheduledRequest, SchedulerOutput

    engine = LLM(model=model, max_model_len=2048).engine
    ids = engine.tokenizer.encode(PASSAGE)[:170]
    req = Request("rows", ids, SamplingParams(max_tokens=16))
    engine.blocks.allocate("rows", len(ids) + 8)
    fill = SchedulerOutput([ScheduledRequest(req, len(ids) - 8)])
    engine.runner.execute(engine.runner.prepare(fill))
    req.num_computed_tokens = len(ids) - 8
    costs = {}
    for rows in range(1, 9):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            engine.runner.execute(engine.runner.prepare(SchedulerOutput([ScheduledRequest(req, rows, samples=True)])))
            times.append(time.perf_counter() - start)
        costs[rows] = statistics.median(times) * 1e3
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model (SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--config", default=json.dumps(DEFAULT_CONFIG), help="speculative_config JSON")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--activations", default="int16", help="--activations of both runs (int8: cheaper verify "
                                                             "steps, coarser answers)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--row-costs", action="store_true", help="only time one sequence's step of 1..8 rows")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.row_costs:
        costs = row_costs(args.model)
        print(json.dumps(costs) if args.json else "  ".join(f"{r} rows {ms:.1f} ms" for r, ms in costs.items()))
        return

    config = json.loads(args.config)
    plain = LLM(model=args.model, max_model_len=2048, activations=args.activations)
    spec = LLM(model=args.model, max_model_len=2048, speculative_config=config, activations=args.activations)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    tasks = args.tasks.split(",")
    for name in tasks:  # warm-up: kernels, first-call allocations
        run_one(plain, TASKS[name], SamplingParams(temperature=0, max_tokens=4))
        run_one(spec, TASKS[name], SamplingParams(temperature=0, max_tokens=4))
    results: dict[str, dict[str, list[dict]]] = {t: {"plain": [], "spec": []} for t in tasks}
    for r in range(args.runs):
        for name in tasks:
            # Alternate which goes first, so drift on a shared machine does not favour one.
            order = [("plain", plain), ("spec", spec)] if r % 2 == 0 else [("spec", spec), ("plain", plain)]
            for label, llm in order:
                results[name][label].append(run_one(llm, TASKS[name], params))

    rows = []
    for name in tasks:
        p, s = results[name]["plain"], results[name]["spec"]
        p_rate = statistics.median(x["decode_tok_s"] for x in p)
        s_rate = statistics.median(x["decode_tok_s"] for x in s)
        drafted = sum(x["draft_tokens"] for x in s)
        accepted = sum(x["accepted"] for x in s)
        rows.append({
            "task": name, "tokens": p[0]["tokens"], "plain_decode_tok_s": p_rate, "spec_decode_tok_s": s_rate,
            "speedup": s_rate / p_rate, "plain_e2e_s": statistics.median(x["e2e_s"] for x in p),
            "spec_e2e_s": statistics.median(x["e2e_s"] for x in s),
            "acceptance_rate": accepted / drafted if drafted else None,
            "identical_text": all(x["text"] == p[0]["text"] for x in p + s),
        })
    speedups = [row["speedup"] for row in rows]
    import torch

    summary = {"config": config, "runs": args.runs, "max_tokens": args.max_tokens, "threads": torch.get_num_threads(),
               "median_speedup": statistics.median(speedups), "tasks": rows,
               "all_identical": all(row["identical_text"] for row in rows)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"speculative_config {json.dumps(config)}; greedy, max_tokens {args.max_tokens}, medians of {args.runs} runs, "
          f"{summary['threads']} threads")
    print(f"{'task':<10} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} {'plain e2e':>9} "
          f"{'spec e2e':>8} {'accept':>6} identical")
    for row in rows:
        acc = "-" if row["acceptance_rate"] is None else f"{100 * row['acceptance_rate']:.0f}%"
        print(f"{row['task']:<10} {row['tokens']:>6} {row['plain_decode_tok_s']:>11.1f} {row['spec_decode_tok_s']:>10.1f} "
              f"{row['speedup']:>6.2f}x {row['plain_e2e_s']:>8.2f}s {row['spec_e2e_s']:>7.2f}s {acc:>6} "
              f"{'yes' if row['identical_text'] else 'NO'}")
    print(f"median speedup {summary['median_speedup']:.2f}x; identical text: {'yes' if summary['all_identical'] else 'NO'}")


if __name__ == "__main__":
    main()
