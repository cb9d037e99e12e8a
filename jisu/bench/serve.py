"""`jisu bench serve`: drive any OpenAI-compatible server with streaming requests and report what
`vllm bench serve` reports, with its definitions (see jisu.bench.metrics), once per concurrency level.

Requests arrive all at once (--request-rate inf) or as a Poisson process of the given rate; at most
--concurrency of them are in flight. Output tokens come from the stream's `usage` (stream_options.
include_usage), or by tokenizing the streamed text when the server sends no usage.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from jisu.bench.metrics import RequestResult, chunk_timing, serve_metrics
from jisu.bench.prompts import Prompt
from jisu.errors import InvalidRequestError, JisuError

MAX_ERRORS_KEPT = 5


@dataclass
class BenchRequest:
    prompt: Prompt
    prompt_len: int
    """Prompt tokens as counted locally (the server's usage.prompt_tokens replaces it when sent)."""
    output_len: int


def parse_concurrency(text: str, flag: str = "--concurrency") -> list[int]:
    out = []
    for part in text.split(","):
        try:
            n = int(part.strip())
        except ValueError:
            raise InvalidRequestError(f"{flag}: {part.strip()!r} is not an integer; give e.g. 1,4,16") from None
        if n < 1:
            raise InvalidRequestError(f"{flag}: {n} must be >= 1")
        out.append(n)
    return out


def parse_rate(text: str, flag: str = "--request-rate") -> float:
    if str(text).strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        rate = float(text)
    except ValueError:
        raise InvalidRequestError(f"{flag}: {text!r} is not a number of requests per second or 'inf'") from None
    if not rate > 0:
        raise InvalidRequestError(f"{flag}: must be > 0 (or inf), got {text}")
    return rate


def payload_for(req: BenchRequest, model: str | None, chat: bool, temperature: float, ignore_eos: bool) -> dict:
    body: dict = {"max_tokens": req.output_len, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": temperature}
    if model:
        body["model"] = model
    if ignore_eos:  # fixed output lengths: vLLM and jisu read ignore_eos, llama-cpp-python's server min_tokens
        body["ignore_eos"] = True
        body["min_tokens"] = req.output_len
    if chat:
        body["messages"] = req.prompt.messages or [{"role": "user", "content": req.prompt.text}]
    else:
        body["prompt"] = req.prompt.text
    return body


def _chunk_text(choice: dict, chat: bool) -> tuple[bool, str]:
    """(is a token chunk, its text). A chat chunk carrying only the role, which some servers send before
    any token is computed, is not a token chunk: counting it would make TTFT meaningless."""
    if not chat:
        return True, choice.get("text") or ""
    delta = choice.get("delta") or {}
    content = delta.get("content") or ""
    if "role" in delta and not content and choice.get("finish_reason") is None:
        return False, ""
    return True, content


async def send_request(client, url: str, body: dict, chat: bool, prompt_len: int, count_tokens=None) -> RequestResult:
    """One streaming request; failures (HTTP errors, error events, broken streams) are recorded, not raised."""
    result = RequestResult(success=False, prompt_tokens=prompt_len)
    chunk_times: list[float] = []
    text: list[str] = []
    usage = None
    start = result.start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode("utf-8", "replace")[:300]
                result.error = f"HTTP {r.status_code}: {detail}"
                return result
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments (pings)
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {event['error']}"
                    return result
                choices = event.get("choices")
                if choices:
                    now = time.perf_counter()
                    is_token, piece = _chunk_text(choices[0], chat)
                    if is_token:
                        chunk_times.append(now)
                        text.append(piece)
                if event.get("usage"):
                    usage = event["usage"]
            if not done:
                result.error = "the stream ended without data: [DONE]"
                return result
    except Exception as e:  # connection refused / reset, timeouts, malformed JSON: a failed request
        result.error = f"{type(e).__name__}: {e}"
        return result
    if not chunk_times:
        result.error = "no token chunk was received"
        return result
    result.ttft, result.itl, result.latency = chunk_timing(start, chunk_times)
    result.generated_text = "".join(text)
    if usage and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            result.prompt_tokens = int(usage["prompt_tokens"])
    elif count_tokens is not None:
        result.output_tokens = count_tokens(result.generated_text)
    else:
        result.output_tokens = len(chunk_times)  # no usage, no tokenizer: one token per chunk
    result.success = True
    return result


async def run_level(client, base_url: str, requests: list[BenchRequest], concurrency: int, rate: float, *,
                    model: str | None, endpoint: str, temperature: float, ignore_eos: bool, seed: int,
                    count_tokens=None) -> tuple[list[RequestResult], float]:
    """All requests at one concurrency level; returns their results and the run's duration."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)

    async def one(req: BenchRequest) -> RequestResult:
        chat = endpoint == "chat" or (endpoint == "auto" and req.prompt.is_chat)
        url = base_url + ("/v1/chat/completions" if chat else "/v1/completions")
        async with sem:
            return await send_request(client, url, payload_for(req, model, chat, temperature, ignore_eos), chat,
                                      req.prompt_len, count_tokens)

    start = time.perf_counter()
    tasks = []
    for i, req in enumerate(requests):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals: exponential gaps
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


WARM_UP_TEXT = "Say hello."


async def warm_up(client, base_url: str, chat: bool, **kw) -> None:
    """One short untimed request: connections settle, and a misconfigured run (wrong URL, model or key) stops
    here with the server's answer instead of N failures. Its prompt is none of the benchmark's, so it warms
    no prefix cache for them."""
    prompt = Prompt(messages=[{"role": "user", "content": WARM_UP_TEXT}]) if chat else Prompt(text=WARM_UP_TEXT)
    results, _ = await run_level(client, base_url, [BenchRequest(prompt, 0, 2)], 1, math.inf, ignore_eos=True,
                                 seed=0, **kw)
    if not results[0].success:
        raise JisuError(f"--base-url {base_url}: the warm-up request failed: {results[0].error}")


# ----------------------------------------------------------------------------- workload


def build_requests(dataset: str, tokenizer, num_prompts: int, input_len: int, output_len: int | None,
                   endpoint: str, seed: int) -> list[BenchRequest]:
    """num_prompts requests: synthetic ones of exactly input_len tokens, or a file's prompts (shuffled with
    the seed, repeated when the file has fewer); output_len overrides a record's own output_len."""
    from jisu.bench.prompts import BUILTIN_DATASET, count_tokens, load_jsonl, synthetic_prompts

    if dataset == "synthetic":
        prompts = synthetic_prompts(tokenizer, num_prompts, input_len, seed)
    else:
        path = BUILTIN_DATASET if dataset == "builtin" else Path(dataset)
        pool = load_jsonl(path)
        random.Random(seed).shuffle(pool)
        prompts = [pool[i % len(pool)] for i in range(num_prompts)]
    out = []
    for p in prompts:
        if p.is_chat and endpoint == "completions":
            if tokenizer is None:
                raise InvalidRequestError("--endpoint completions with chat prompts needs --tokenizer")
            p = Prompt(text=tokenizer.apply_chat_template(p.messages), output_len=p.output_len)
        n = count_tokens(tokenizer, p) if tokenizer is not None else 0
        out.append(BenchRequest(p, n, output_len or p.output_len or 128))
    return out


def default_model_name(client_get, base_url: str) -> str | None:
    """The first model id the server lists, or None when it lists none."""
    r = client_get(base_url + "/v1/models")
    if r.status_code != 200:
        return None
    data = r.json().get("data") or []
    return data[0].get("id") if data else None


def run_serve(base_url: str, levels: list[tuple[int, list[BenchRequest]]], rate: float = math.inf, *,
              model: str | None = None, endpoint: str = "auto", temperature: float = 0.0, ignore_eos: bool = True,
              percentiles=(99.0,), goodput: dict | None = None, api_key: str | None = None, seed: int = 0,
              count_tokens=None, timeout_s: float = 3600.0, log=None) -> list[dict]:
    """One result dict per (concurrency, requests) level, each with every vLLM field plus the first errors
    seen. Give each level its own prompts: a server's prefix cache would otherwise serve a later level's
    prompts from an earlier one's work."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base_url = base_url.rstrip("/")
    widest = max(c for c, _ in levels)
    common = dict(model=model, endpoint=endpoint, temperature=temperature)

    async def all_levels() -> list[dict]:
        limits = httpx.Limits(max_connections=widest + 4, max_keepalive_connections=widest + 4)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10),
                                     limits=limits) as client:
            first = levels[0][1][0].prompt
            await warm_up(client, base_url, endpoint == "chat" or (endpoint == "auto" and first.is_chat), **common)
            out = []
            for c, requests in levels:
                results, duration = await run_level(client, base_url, requests, c, rate, ignore_eos=ignore_eos,
                                                    seed=seed, count_tokens=count_tokens, **common)
                level = {"max_concurrency": c, "request_rate": "inf" if math.isinf(rate) else rate,
                         "num_prompts": len(requests)}
                level |= serve_metrics(results, duration, percentiles, goodput)
                level["errors"] = [r.error for r in results if not r.success][:MAX_ERRORS_KEPT]
                out.append(level)
                if log:
                    log(format_level(level, percentiles, goodput))
            return out

    return asyncio.run(all_levels())


def format_level(m: dict, percentiles=(99.0,), goodput: dict | None = None) -> str:
    """The run summary laid out as vLLM prints it."""
    def row(label, value, fmt="{:.2f}"):
        return f"{label:<40} {('-' if value is None else fmt.format(value)):<10}"

    lines = [f"{' Serving Benchmark Result (concurrency ' + str(m['max_concurrency']) + ') ':=^60}",
             row("Successful requests:", m["completed"], "{}"),
             row("Failed requests:", m["failed"], "{}"),
             row("Maximum request concurrency:", m["max_concurrency"], "{}"),
             row("Request rate (req/s):", m["request_rate"], "{}"),
             row("Benchmark duration (s):", m["duration"]),
             row("Total input tokens:", m["total_input_tokens"], "{}"),
             row("Total generated tokens:", m["total_output_tokens"], "{}"),
             row("Request throughput (req/s):", m["request_throughput"])]
    if goodput:
        lines.append(row("Request goodput (req/s):", m["request_goodput"]))
    lines += [row("Output token throughput (tok/s):", m["output_throughput"]),
              row("Total token throughput (tok/s):", m["total_token_throughput"])]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{title:-^60}")
        lines.append(row(f"Mean {key.upper()} (ms):", m[f"mean_{key}_ms"]))
        lines.append(row(f"Median {key.upper()} (ms):", m[f"median_{key}_ms"]))
        for q in percentiles:
            lines.append(row(f"P{q:g} {key.upper()} (ms):", m[f"p{q:g}_{key}_ms"]))
    lines.append("=" * 60)
    for e in m.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def cmd_serve_bench(args) -> int:
    import httpx

    from jisu.bench.metrics import parse_goodput, parse_percentiles
    from jisu.bench.prompts import load_tokenizer

    concurrencies = parse_concurrency(args.concurrency)
    rate = parse_rate(args.request_rate)
    percentiles = parse_percentiles(args.percentiles)
    slos = parse_goodput(args.goodput)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise InvalidRequestError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.input_len < 1:
        raise InvalidRequestError(f"--input-len must be >= 1, got {args.input_len}")
    if args.output_len is not None and args.output_len < 1:
        raise InvalidRequestError(f"--output-len must be >= 1, got {args.output_len}")
    if not args.base_url.startswith(("http://", "https://")):
        raise InvalidRequestError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    base_url = args.base_url.rstrip("/")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None

    try:
        model = args.model or default_model_name(
            lambda u: httpx.get(u, timeout=10, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}),
            base_url)
    except httpx.HTTPError as e:
        raise JisuError(f"--base-url {base_url}: the server cannot be reached ({type(e).__name__}: {e})") from None
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except JisuError as e:
        if args.dataset == "synthetic":
            raise JisuError(f"--tokenizer: synthetic prompts need the served model's tokenizer: {e}") from None
        print(f"note: no tokenizer ({e}); token counts come from the server's usage only", file=sys.stderr)
    num_prompts = args.num_prompts or max(8, 4 * max(concurrencies))
    # Fresh synthetic prompts per level (a different seed each); a file's prompts repeat, so a server with a
    # prefix cache serves the later levels' prompts partly from it.
    plan = [(c, build_requests(args.dataset, tokenizer, num_prompts, args.input_len, args.output_len,
                               args.endpoint, args.seed + 1000 * i)) for i, c in enumerate(concurrencies)]
    count = (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer else None
    levels = run_serve(base_url, plan, rate, model=model, endpoint=args.endpoint,
                       temperature=args.temperature, ignore_eos=args.ignore_eos, percentiles=percentiles,
                       goodput=slos, api_key=api_key, seed=args.seed, count_tokens=count,
                       log=lambda s: print(s, flush=True))
    result = {"command": "serve", "label": args.label or model or base_url, "base_url": base_url, "model": model,
              "dataset": args.dataset, "input_len": args.input_len if args.dataset == "synthetic" else None,
              "output_len": args.output_len, "endpoint": args.endpoint, "temperature": args.temperature,
              "ignore_eos": args.ignore_eos, "percentiles": list(percentiles), "goodput_slos_ms": slos,
              "levels": levels}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from jisu.bench.plots import load_results, serve_plots

        series = [result] + [load_results(p, "--plot-with") for p in args.plot_with or ()]
        for path in serve_plots(series, args.plot, percentiles):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if all(lv["completed"] == 0 for lv in levels) else 0
