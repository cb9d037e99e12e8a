"""LLMEngine: add_request / step / abort. Wires tokenizer, scheduler, runner and sampler together.

One prompt and a thousand take the same path: every request becomes one or more sequences in the
scheduler, and every step runs whatever the scheduler picked in a single forward pass.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import torch

from jisu.capabilities import low_bit_support, resolve_device, resolve_dtype
from jisu.config import EngineConfig
from jisu.detokenizer import OutputText
from jisu.errors import ContextLengthError, InvalidRequestError
from jisu.loader.checkpoint import Checkpoint
from jisu.model_run import ModelRun
from jisu.pooling import PoolingParams, pooled_vector
from jisu.profile.timeline import StepLog, StepRecord
from jisu.quant.calibration import calibration_texts, input_statistics
from jisu.quant.plan import WeightsSpec, load_rounding, plan_for
from jisu.request import CompletionOutput, FinishReason, Request, RequestMetrics, RequestOutput
from jisu.sampling import Sampler, SamplingRow, make_generator
from jisu.sampling_params import SamplingParams
from jisu.scheduler.scheduler import Scheduler
from jisu.structured.grammar import StructuredOutputs
from jisu.tokenizer import Tokenizer

class _Group:
    """The sequences of one request (n of them) and what the caller has seen."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], seqs: list[Request]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.seqs = seqs

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None, progress: Callable | None = None):
        self.config = config
        # The load runs one way: what runs here -> checkpoint -> the format of each matrix (calibrated where the
        # format needs it) -> model on its KV cache -> scheduler and sampler around it.
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        spec = WeightsSpec(config.weights, config.group_size, config.outlier_columns)
        support = low_bit_support(self.device, self.dtype, config.cpu_kernels)
        formats = support.formats(spec.name)
        if checkpoint is None:
            from jisu.loader.resolve import load_checkpoint

            checkpoint = load_checkpoint(config.model, keep_blocks=spec.keeps_blocks and bool(formats))
        ckpt = checkpoint
        plan = plan_for(ckpt, spec, formats, self.dtype)
        statistics = None
        if plan.needs_statistics:
            # Calibration, a step of its own: a run of the checkpoint in its own precision (a ModelRun, not an engine).
            statistics = input_statistics(ckpt, calibration_texts())
        tensors = plan.apply(ckpt.tensors, load_rounding(spec, statistics))
        self.weights = spec.label()
        self.model_config = ckpt.config
        self.model_source = ckpt.source
        self.tokenizer = Tokenizer(ckpt.tokenizer)
        self.eos_token_ids = tuple(dict.fromkeys(ckpt.tokenizer.eos_token_ids + ckpt.config.eos_token_ids))

        run = ModelRun.build(config, self.model_config, tensors, self.device, self.dtype, support)
        self.model_run = run
        """The model on its KV cache (model, kv_cache, blocks and runner below are its own)."""
        self.model, self.kv_cache, self.blocks, self.runner = run.model, run.kv_cache, run.blocks, run.runner
        self.kv_dtype = run.kv_dtype
        self.max_model_len = run.max_model_len
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.structured = StructuredOutputs(ckpt.tokenizer.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        """Structured-output grammars (llguidance reads the tokenizer on the first request that has one)."""
        self.sampler = Sampler(structured=self.structured)
        self.speculator = None
        """Speculative decoding (jisu/spec_decode), when config.speculative asks for it."""
        if config.speculative is not None:
            from jisu.spec_decode.speculator import Speculator

            draft_run = None
            if config.speculative.method == "draft_model":
                from jisu.spec_decode.draft_model import load_draft_run

                draft_run = load_draft_run(config.speculative, config, ckpt, self.device, self.dtype, support,
                                           self.max_model_len)
            self.speculator = Speculator(config.speculative, self.sampler, self.max_model_len, draft_run)
        torch.manual_seed(config.seed)

        self.step_log = StepLog()
        self.record_steps = True
        """Keep a StepRecord per step (cheap; off only to measure what recording costs)."""
        self._groups: dict[str, _Group] = {}
        self._texts: dict[str, OutputText] = {}
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        pooling: PoolingParams | None = None,
    ) -> str:
        """Queues a prompt (text or token ids). `arrival_time` (time.perf_counter) lets a front end that
        received the request earlier, e.g. on another thread, count its queue time from then. `pooling` makes it
        an embedding request: its prompt is computed (max_tokens 0) and RequestOutput.embedding returned."""
        if pooling is not None:
            params = params or SamplingParams(max_tokens=0)
            self._check_pooling(pooling, params)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        self._check_fits(len(ids), params)
        self._check_logit_bias(params)
        request_id = request_id or str(next(self._ids))
        if request_id in self._groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        # Compiled once per request (a bad schema or grammar is refused here); each sequence walks it on its own.
        grammar = self.structured.compile(params.structured_outputs) if params.structured_outputs else None
        seqs = []
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            generator = make_generator(params.seed, i) if params.seed is not None else None
            seq = Request(seq_id, ids, params, self.eos_token_ids, self.max_model_len, generator, request_id, i,
                          pooling)
            if grammar is not None:
                seq.grammar = self.structured.matcher(grammar)
            if arrival_time is not None:
                seq.times.arrival = arrival_time
            seqs.append(seq)
            self._texts[seq_id] = OutputText(self.tokenizer, seq)
            self.scheduler.add(seq)
        self._groups[request_id] = _Group(request_id, text, ids, seqs)
        return request_id

    def _check_pooling(self, pooling: PoolingParams, params: SamplingParams) -> None:
        if not isinstance(pooling, PoolingParams):
            raise InvalidRequestError(f"pooling must be a PoolingParams, got {type(pooling).__name__}")
        if params.max_tokens != 0 or params.n != 1:
            raise InvalidRequestError(
                f"a pooling request computes only its prompt: max_tokens must be 0 and n 1, "
                f"got max_tokens={params.max_tokens}, n={params.n}"
            )
        hidden = self.model_config.hidden_size
        if pooling.dimensions is not None and pooling.dimensions > hidden:
            raise InvalidRequestError(f"dimensions {pooling.dimensions} exceeds the model's hidden size {hidden}")

    def _tokenize(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):  # vLLM's prompt dicts: {"prompt": text} or {"prompt_token_ids": ids}
            keys = set(prompt)
            if keys not in ({"prompt"}, {"prompt_token_ids"}):
                raise InvalidRequestError(
                    f"a prompt dict takes exactly one key, 'prompt' (text) or 'prompt_token_ids' (token ids), "
                    f"got {sorted(keys)}"
                )
            return self._tokenize(prompt.get("prompt", prompt.get("prompt_token_ids")))
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty; give at least one character")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise InvalidRequestError("prompt token ids are empty; give at least one token")
            vocab = self.model_config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
            return None, list(prompt)
        raise InvalidRequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        limit = self.max_model_len
        # max_tokens 0 generates nothing, so its prompt may fill the whole window.
        if prompt_len > limit or (prompt_len == limit and params.max_tokens != 0):
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens but the context window is {limit} tokens "
                f"(room is needed for at least one generated token)"
            )
        if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = "
                f"{prompt_len + params.max_tokens} exceeds the context window of {limit} tokens"
            )

    def _check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        for token in params.logit_bias or ():
            if token >= vocab:
                raise InvalidRequestError(f"logit_bias: token id {token} is outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
            self._texts.pop(seq.request_id, None)
            if self.speculator is not None:
                self.speculator.release(seq.request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one batched forward pass; returns the updated state of every request that advanced."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        t1 = time.perf_counter()
        step = self.runner.prepare(out)
        t2 = time.perf_counter()
        logits = self.runner.execute(step)
        t3 = time.perf_counter()
        prefill_tokens = self._record_prefill_chunks(out, t2, t3)
        self.scheduler.update(out)
        touched: dict[str, _Group] = {}
        self._keep_prompt_rows(step, out, touched)
        # Per sampled sequence: the tokens it gains this step, their logprobs, drafts verified and accepted.
        gained: list[tuple[Request, list[int], list, int, int]] = []
        if step.sampled:
            with torch.inference_mode():  # the logits are the runner's inference tensors, written in place
                gained = self._sample(step, logits)
        t4 = time.perf_counter()
        num_accepted = 0
        for req, tokens, logprobs, drafted, accepted in gained:
            for token, lp in zip(tokens, logprobs):
                self._advance(req, token, lp, t4)
                if req.is_finished:  # a stop among the accepted tokens: the rest are dropped
                    break
            if drafted:
                num_accepted += accepted
                req.times.events.append(("verify", t2, t4, accepted))
                self.scheduler.accept(req, accepted)
            touched[req.parent_id] = self._groups[req.parent_id]
        outputs = [self._output(g) for g in touched.values()]
        t5 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.release_finished()
            self.speculator.propose(self.scheduler.running)
        t6 = time.perf_counter()
        if not self.record_steps:
            return outputs
        self.step_log.add(
            StepRecord(
                index=self.step_log.count, start=t0, schedule=t1 - t0, prepare=t2 - t1, forward=t3 - t2,
                sample=t4 - t3, detokenize=t5 - t4, num_seqs=len(out.scheduled), num_tokens=out.num_tokens,
                num_prefill_tokens=prefill_tokens, num_decodes=out.num_tokens - prefill_tokens,
                num_preempted=len(out.preempted), forward_device=self.runner.last_forward_device_time(),
                batch=tuple((s.num_new_tokens, s.request.num_computed_tokens, s.samples) for s in out.scheduled),
                draft=t6 - t5, num_draft_tokens=sum(s.num_spec for s in out.scheduled),
                num_accepted_tokens=num_accepted,
            )
        )
        return outputs

    def _sample(self, step, logits: torch.Tensor) -> list[tuple[Request, list[int], list, int, int]]:
        """Samples every sampled sequence's next token; a sequence verifying drafts gets its accepted drafts and one
        more token (rejection sampling, jisu/spec_decode/rejection.py)."""
        seqs = [s.request for s in step.sampled]
        counts = step.sample_counts or [1] * len(seqs)
        if all(c == 1 for c in counts):
            rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, r.grammar) for r in seqs]
            sampled = self.sampler(logits, rows, overwrite=True)
            return [(r, [t], [lp], 0, 0) for r, t, lp in zip(seqs, sampled.token_ids, sampled.logprobs)]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        plain = [i for i, c in enumerate(counts) if c == 1]
        spec = [i for i, c in enumerate(counts) if c > 1]
        result: list = [None] * len(seqs)
        if plain:
            rows = [SamplingRow(seqs[i].params, seqs[i].prompt_token_ids, seqs[i].output_token_ids, seqs[i].generator,
                                seqs[i].grammar) for i in plain]
            sampled = self.sampler(logits[[starts[i] for i in plain]], rows, overwrite=True)
            for i, t, lp in zip(plain, sampled.token_ids, sampled.logprobs):
                result[i] = (seqs[i], [t], [lp], 0, 0)
        spec_rows = [r for i in spec for r in range(starts[i], starts[i + 1])]
        spec_logits = logits if len(spec_rows) == logits.shape[0] else logits[spec_rows]
        reqs = [seqs[i] for i in spec]
        drafts = [list(r.spec_token_ids) for r in reqs]
        verified = self.speculator.verify(spec_logits, reqs, drafts, [r.spec_probs for r in reqs])
        r0 = 0
        for i, req, draft, v in zip(spec, reqs, drafts, verified):
            logprobs = [None] * len(v.tokens)
            if req.params.logprobs is not None:  # the raw rows of the emitted tokens, as plain sampling gives
                raw = spec_logits[r0 : r0 + len(v.tokens)]
                logprobs = self.sampler._logprobs(raw, torch.tensor(v.tokens, device=raw.device), v.tokens,
                                                  [req.params] * len(v.tokens))
            r0 += len(draft) + 1
            req.spec_token_ids, req.spec_probs = [], None
            result[i] = (req, v.tokens, logprobs, len(draft), v.num_accepted)
        return result

    def _keep_prompt_rows(self, step, out, touched: dict[str, _Group]) -> None:
        """Stores the prompt logprobs and hidden rows the runner kept, and finishes max_tokens-0 requests whose
        prompt is now computed (they sample nothing: finish_reason "length", no token)."""
        for req, pos, entries in step.prompt_logprobs:
            req.keep_prompt_logprobs(pos, entries)
        for req, pos, rows in step.hidden:
            req.keep_hidden(pos, rows)
        for s in out.scheduled:
            req = s.request
            if req.params.max_tokens == 0 and not req.is_finished and req.num_computed_tokens >= req.num_tokens:
                req.finish(FinishReason.LENGTH)
                self.scheduler.finish(req)
                touched[req.parent_id] = self._groups[req.parent_id]

    @staticmethod
    def _record_prefill_chunks(out, start: float, end: float) -> int:
        """Adds a 'prefill' event to each sequence that computed prompt (or recomputed) tokens this step."""
        total = 0
        for s in out.scheduled:
            req = s.request
            # A decode computes exactly the one token sampled last step (plus any drafts it verifies); anything
            # else is (re)filling.
            if (s.num_new_tokens - s.num_spec > 1 or req.num_computed_tokens < len(req.prompt_token_ids)
                    or not s.samples):
                req.times.events.append(("prefill", start, end, s.num_new_tokens - s.num_spec))
                total += s.num_new_tokens - s.num_spec
        return total

    def _advance(self, req: Request, token: int, logprobs, now: float) -> None:
        req.append_token(token, logprobs, now)
        is_eos = token in req.eos_token_ids and not req.params.ignore_eos
        if not is_eos:
            self._texts[req.request_id].add_token(req, token)
        if req.grammar is not None and not is_eos:
            req.grammar.consume(token)
        if not req.is_finished:
            req.check_token_stop()
        if not req.is_finished and req.grammar is not None and req.grammar.is_done:
            # Only end-of-sequence could follow: finish now rather than spend a step sampling it.
            req.finish(FinishReason.STOP)
        if req.is_finished:
            self.scheduler.finish(req)

    def _output(self, group: _Group) -> RequestOutput:
        finished = group.finished
        outputs = []
        for seq in group.seqs:
            text = self._texts[seq.request_id]
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text.visible(seq.is_finished),
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                    metrics=RequestMetrics.from_request(seq) if seq.is_finished else None,
                    timeline=seq.times,
                )
            )
        if finished:
            self._groups.pop(group.request_id, None)
            for seq in group.seqs:
                self._texts.pop(seq.request_id, None)
        first = group.seqs[0]  # the sequence that computes a shared prompt's rows
        embedding = None
        if first.pooling is not None and first.is_finished and first.pooled_sum is not None:
            embedding = pooled_vector(first.pooling, first.pooled_sum, len(first.prompt_token_ids),
                                      self.model_config.hidden_size)
        prompt_logprobs = None
        if first.prompt_logprobs is not None and first.num_computed_tokens >= len(first.prompt_token_ids):
            prompt_logprobs = list(first.prompt_logprobs)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_ids,
            outputs=outputs,
            finished=finished,
            metrics=outputs[0].metrics if finished else None,
            prompt_logprobs=prompt_logprobs,
            embedding=embedding,
        )
