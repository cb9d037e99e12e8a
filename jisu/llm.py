"""The Python API: LLM(model=...).generate / chat / stream, and score / classify / embed for evaluators."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from jisu.config import CacheConfig, EngineConfig, SchedulerConfig
from jisu.engine import LLMEngine
from jisu.errors import InvalidRequestError
from jisu.pooling import PoolingParams
from jisu.request import RequestOutput
from jisu.sampling_params import SamplingParams
from jisu.structured import StructuredOutputsParams
from jisu.scoring import ClassifyOutput, ScoreOutput, check_normalize, classify_output, encode_pair, score_output


class LLM:
    """Loads a model once and serves batches of prompts through the continuous-batching engine.

    >>> llm = LLM()                       # the default model, SmolLM2-135M-Instruct
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text, out[0].metrics.decode_tokens_per_s

    model: a GGUF file, a Hugging Face model folder, a short name (smollm2-135m, gemma3-270m), or a Hugging Face
    Hub id, downloaded into the HF cache on first use (offline, HF_HUB_OFFLINE=1, the cached copy is used):
    LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct"), "org/name-GGUF:Q4_K_M" (a GGUF by quantization label),
    "org/name@v1.0" (a branch, tag or commit), "org/name@v1.0:Q8_0". See jisu.loader.hub.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 1024,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        cpu_kernels: bool = True,
        checkpoint=None,
        weights: str = "auto",
        group_size: int | None = None,
        activations: str = "int16",
        kv_cache_dtype: str = "auto",
        deterministic: bool = True,
        speculative_config: dict | str | None = None,
    ):
        """speculative_config: vLLM's, e.g. {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2} or {"method": "draft_model", "model": PATH, "num_speculative_tokens": 3}
        (jisu.spec_decode.SpeculativeConfig); greedy output is unchanged, sampled output keeps its distribution."""
        config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            weights=weights,
            group_size=group_size,
            activations=activations,
            max_model_len=max_model_len,
            seed=seed,
            deterministic=deterministic,
            cpu_kernels=cpu_kernels,
            speculative=speculative_config,
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                enable_prefix_caching=enable_prefix_caching,
                dtype=kv_cache_dtype,
            ),
        )
        self.engine = LLMEngine(config, checkpoint=checkpoint)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | dict | Sequence[str | list[int] | dict],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion, all batched together; returns outputs in prompt order. A prompt is
        text, a list of token ids, or (as in vLLM) {"prompt": text} or {"prompt_token_ids": ids}."""
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        )
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise InvalidRequestError("prompts is empty; give at least one prompt")
        param_list = _per_prompt(params, len(prompt_list))
        return self._run(prompt_list, param_list)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (or a list of them) and generates."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs:
            raise InvalidRequestError("messages is empty; give at least one message")
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt) for c in convs]
        return self._run(prompts, _per_prompt(params, len(prompts)))

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas of one request as they are decoded (n must be 1)."""
        shown = 0
        for out in self.stream_outputs(prompt, params):
            text = out.outputs[0].text
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)

    def stream_outputs(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the growing RequestOutput of one request after each step that advanced it; the last one has
        finished=True and metrics. The request is aborted if the caller stops iterating early."""
        params = params or SamplingParams()
        if params.n != 1:
            raise InvalidRequestError(f"n must be 1 for a stream, got {params.n}")
        engine = self.engine
        rid = engine.add_request(prompt, params)
        done = False
        try:
            while not done and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                engine.abort(rid)

    def score(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        continuations: str | Sequence[int] | Sequence[str | Sequence[int]],
        add_special_tokens: bool = False,
    ) -> list[ScoreOutput]:
        """Per (prompt, continuation) pair, the continuation's log-likelihood given the prompt: the sum, per token
        logprobs and whether it is the greedy continuation (lm-eval's loglikelihood, tokenised as it does: see
        jisu.scoring). Text or token-id lists; one prompt may go with several continuations. All pairs run
        batched through the engine, each prompt's logprobs from its own prefill."""
        contexts, conts = _pairs(prompts, continuations)
        pairs = [encode_pair(self.tokenizer, c, x, add_special_tokens) for c, x in zip(contexts, conts)]
        params = SamplingParams(max_tokens=0, prompt_logprobs=0, temperature=0)
        outs = self._run([ctx + cont for ctx, cont in pairs], [params] * len(pairs))
        return [score_output(o.prompt_logprobs, len(ctx)) for o, (ctx, _) in zip(outs, pairs)]

    def classify(
        self,
        texts: str | Sequence[str],
        labels: Sequence[str],
        template: str = "{text}",
        label_template: str = " {label}",
        normalize: str | None = None,
        method: str = "likelihood",
    ) -> list[ClassifyOutput]:
        """Each text's label by likelihood: the context template.format(text=...) is scored against every
        continuation label_template.format(label=...), and the best wins. normalize: None (sum of logprobs),
        'tokens' (mean per token) or 'chars' (per character of the label, lm-eval's acc_norm).
        method='choice' instead generates greedily under a choice constraint over the label continuations (one
        decode per text, not one score per label; the label's first tokens decide, so no scores or probs)."""
        check_normalize(normalize)
        texts = [texts] if isinstance(texts, str) else list(texts)
        labels = list(labels)
        if not texts or len(labels) < 2:
            raise InvalidRequestError(f"give at least one text and two labels, got {len(texts)} and {len(labels)}")
        if method == "choice":
            return self._classify_by_choice(texts, labels, template, label_template)
        if method != "likelihood":
            raise InvalidRequestError(f"method must be 'likelihood' or 'choice', got {method!r}")
        contexts = [template.format(text=t) for t in texts for _ in labels]
        conts = [label_template.format(label=label) for _ in texts for label in labels]
        scored = self.score(contexts, conts)
        k = len(labels)
        return [classify_output(labels, scored[i * k : (i + 1) * k], normalize) for i in range(len(texts))]

    def _classify_by_choice(self, texts: list[str], labels: list[str], template: str,
                            label_template: str) -> list[ClassifyOutput]:
        continuations = [label_template.format(label=label) for label in labels]
        if len(set(continuations)) != len(labels):
            raise InvalidRequestError("labels must be distinct")
        by_text = dict(zip(continuations, labels))
        # No token is shorter than a byte, so a label's bytes bound the tokens the grammar may take to write it.
        longest = max(len(c.encode("utf-8")) for c in continuations)
        params = SamplingParams(temperature=0, max_tokens=longest + 1,
                                structured_outputs=StructuredOutputsParams(choice=continuations))
        outs = self._run([template.format(text=t) for t in texts], [params] * len(texts))
        return [ClassifyOutput(label=by_text[o.text]) for o in outs]

    def embed(
        self,
        texts: str | Sequence[int] | Sequence[str | Sequence[int]],
        pooling: str = "last",
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        """One vector per text (or token-id list): the final hidden states after the final norm, pooled over the
        prompt ('last' token or 'mean'), L2-normalised unless normalize=False, cut to `dimensions` if given."""
        single = isinstance(texts, str) or (isinstance(texts, list) and texts and all(isinstance(t, int) for t in texts))
        items = [texts] if single else list(texts)
        if not items:
            raise InvalidRequestError("texts is empty; give at least one text")
        spec = PoolingParams(pooling, normalize, dimensions)
        outs = self._run(items, [SamplingParams(max_tokens=0)] * len(items), spec)
        return [o.embedding for o in outs]

    def _run(self, prompts: list, params: list[SamplingParams], pooling: PoolingParams | None = None
             ) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(engine.add_request(p, sp, pooling=pooling))
        except Exception:
            for rid in ids:
                engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        try:
            while len(results) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        return [results[rid] for rid in ids]


def _pairs(prompts, continuations) -> tuple[list, list]:
    """Prompts and continuations as two equal lists (a single prompt goes with every continuation)."""
    def items(x):
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and all(isinstance(t, int) for t in x)):
            return [x], True
        return list(x), False

    ctxs, one_ctx = items(prompts)
    conts, _ = items(continuations)
    if one_ctx:
        ctxs = ctxs * len(conts)
    if len(ctxs) != len(conts) or not conts:
        raise InvalidRequestError(f"got {len(ctxs)} prompts for {len(conts)} continuations; give one each")
    return ctxs, conts


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {count} prompts; give one or one each")
    return params
