"""Draft-model proposals: a second, smaller model with the target's tokenizer, on its own KV cache and blocks.

Each speculating sequence has a shadow sequence in the draft's block manager. Before proposing, the shadow is
synced with the target's tokens: its computed count rolls back to the longest prefix whose K/V it computed for
the same tokens (drafts the target rejected are overwritten, accepted ones kept), then the draft catches up
and runs k single-token steps, all speculating sequences batched in each.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from jisu.config import CacheConfig, EngineConfig
from jisu.errors import InvalidRequestError
from jisu.model_run import ModelRun
from jisu.request import Request
from jisu.sampling import Sampler, SamplingRow
from jisu.sampling_params import SamplingParams
from jisu.scheduler.scheduler import ScheduledRequest, SchedulerOutput
from jisu.spec_decode.rejection import _uniform, draw, softmax_row

_SHADOW_PARAMS = SamplingParams(max_tokens=1)


def load_draft_run(spec, config: EngineConfig, target_ckpt, device, dtype, support, max_model_len: int) -> ModelRun:
    """The draft model of `spec` (SpeculativeConfig) as a ModelRun beside the target: same device, compute dtype
    and KV-cache dtype; its own cache for the target's context window, no prefix caching."""
    from jisu.loader.resolve import load_checkpoint
    from jisu.quant.plan import WeightsSpec, load_rounding, plan_for

    wspec = WeightsSpec("auto", None, None)
    formats = support.formats(wspec.name)
    ckpt = spec.draft_checkpoint
    if ckpt is None:
        ckpt = load_checkpoint(spec.model, keep_blocks=wspec.keeps_blocks and bool(formats))
    check_same_tokenizer(ckpt, target_ckpt, spec.model)
    plan = plan_for(ckpt, wspec, formats, dtype)
    tensors = plan.apply(ckpt.tensors, load_rounding(wspec, None))
    draft_config = replace(
        config, model=spec.model, weights="auto", group_size=None, outlier_columns=None, max_model_len=max_model_len,
        cache=CacheConfig(block_size=config.cache.block_size, enable_prefix_caching=False, dtype=config.cache.dtype,
                          kv_cache_memory_bytes=config.cache.kv_cache_memory_bytes),
        speculative=None,
    )
    return ModelRun.build(draft_config, ckpt.config, tensors, device, dtype, support)


def check_same_tokenizer(draft, target, name) -> None:
    """Draft tokens are fed to the target as they are, so both must number the vocabulary the same way."""
    dv, tv = draft.config.vocab_size, target.config.vocab_size
    if dv != tv:
        raise InvalidRequestError(
            f"speculative_config.model {name!r}: its vocabulary has {dv} entries, the target's {tv}; a draft "
            f"model must share the target's tokenizer"
        )
    if draft.tokenizer.tokenizer.get_vocab(with_added_tokens=True) != target.tokenizer.tokenizer.get_vocab(
        with_added_tokens=True
    ):
        raise InvalidRequestError(
            f"speculative_config.model {name!r}: its tokenizer differs from the target's; a draft model must "
            f"share the target's tokenizer"
        )


class DraftModelProposer:
    def __init__(self, run: ModelRun, sampler: Sampler):
        self.run = run
        self.sampler = sampler
        self.shadows: dict[str, tuple[Request, Request]] = {}
        """Target sequence id -> (target, shadow sequence in the draft's blocks)."""

    def release(self, request_id: str) -> None:
        entry = self.shadows.pop(request_id, None)
        if entry is not None:
            self.run.blocks.free(entry[1].request_id)

    def release_finished(self) -> None:
        for rid, (target, _) in list(self.shadows.items()):
            if target.is_finished:
                self.release(rid)

    def _sync(self, target: Request, k: int) -> Request | None:
        entry = self.shadows.get(target.request_id)
        if entry is None:
            shadow = Request(f"draft:{target.request_id}", target.prompt_token_ids, _SHADOW_PARAMS)
            self.shadows[target.request_id] = (target, shadow)
        else:
            shadow = entry[1]
        # Roll back to the prefix computed for the target's own tokens (rejected drafts differ from them).
        n_prompt = len(target.prompt_token_ids)
        # At most all but the last token: its row gives the first draft. (A target preempted before verifying
        # can sample the token the shadow drafted and fed already.)
        upto = min(shadow.num_computed_tokens, target.num_tokens - 1)
        if upto > n_prompt:
            mine = np.asarray(shadow.output_token_ids[: upto - n_prompt])
            theirs = np.asarray(target.output_token_ids[: upto - n_prompt])
            diff = np.flatnonzero(mine != theirs)
            if diff.size:
                upto = n_prompt + int(diff[0])
        shadow.num_computed_tokens = upto
        shadow.output_token_ids = list(target.output_token_ids)
        blocks = self.run.blocks
        if not blocks.allocate(shadow.request_id, target.num_tokens + k - 1):
            # The draft's cache is full: drop shadows of sequences not running now, then try once more.
            for rid, (t, _) in list(self.shadows.items()):
                if rid != target.request_id and t.status.value != "running":
                    self.release(rid)
            if not blocks.allocate(shadow.request_id, target.num_tokens + k - 1):
                self.release(target.request_id)
                return None
        return shadow

    @torch.inference_mode()
    def propose(self, targets: list[Request], ks: list[int]) -> list[tuple[list[int], np.ndarray | None]]:
        """Per target sequence, up to ks[i] draft tokens and (for sampled sequences) the float64 distributions
        [k, vocab] they were drawn from (None for greedy ones, whose verification needs no q)."""
        active = []
        for target, k in zip(targets, ks):
            shadow = self._sync(target, k)
            if shadow is not None:
                active.append((target, shadow, k))
        drafts: dict[str, list[int]] = {t.request_id: [] for t in targets}
        probs: dict[str, list[np.ndarray]] = {t.request_id: [] for t in targets}
        runner = self.run.runner
        for j in range(max((k for *_, k in active), default=0)):
            now = [(t, s) for t, s, k in active if j < k]
            out = SchedulerOutput([ScheduledRequest(s, s.num_tokens - s.num_computed_tokens, samples=True)
                                   for _, s in now])
            step = runner.prepare(out)
            logits = runner.execute(step)
            # The runner lays single-token rows out first: map its sampled order back to ours.
            order = {id(sr.request): i for i, sr in enumerate(step.sampled)}
            logits = logits[[order[id(s)] for _, s in now]]
            rows = [SamplingRow(t.params, t.prompt_token_ids, s.output_token_ids, t.generator) for t, s in now]
            x = self.sampler.processed_logits(logits, rows).to(device="cpu", dtype=torch.float64).numpy()
            for i, (t, s) in enumerate(now):
                s.num_computed_tokens = s.num_tokens
                if t.params.greedy:
                    token = int(x[i].argmax())
                else:
                    q = softmax_row(x[i])
                    token = draw(q, _uniform(self.sampler, t.generator))
                    probs[t.request_id].append(q)
                s.output_token_ids.append(token)
                drafts[t.request_id].append(token)
        result = []
        for t in targets:
            p = probs[t.request_id]
            result.append((drafts[t.request_id], np.stack(p) if p else None))
        return result
