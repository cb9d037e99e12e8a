import math

import pytest
import torch

from jisu.sampling import (
    Sampler,
    SamplingRow,
    TokenLogprobs,
    apply_min_p,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw_from_softmax,
    make_generator,
)
from jisu.sampling_params import SamplingParams

NEG_INF = float("-inf")


def row(prompt=(), output=(), generator=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), generator)


def log_probs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def kept(t: torch.Tensor) -> list[list[int]]:
    """Indices of the tokens a truncation left finite, per row."""
    return [torch.isfinite(r).nonzero().flatten().tolist() for r in t]


# --- each transform against a hand-worked example ---


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0], [2.0, -2.0, 1.0, 0.5, -1.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 1], [3]], torch.tensor([2.0, 0.5]))
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, -1.0], [2.0, -2.0, 1.0, 1.0, -1.0]]


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.ones(2, 4)
    out = apply_presence_frequency_penalties(
        logits, [[0, 0, 2], []], presence=torch.tensor([0.5, 1.0]), frequency=torch.tensor([0.25, 1.0])
    )
    # token 0 seen twice: 1 - 2*0.25 - 0.5; token 2 once: 1 - 0.25 - 0.5; second row saw nothing.
    assert out.tolist() == [[0.0, 1.0, 0.25, 1.0], [1.0, 1.0, 1.0, 1.0]]


def test_penalty_token_ids_outside_the_vocab_are_ignored():
    out = apply_presence_frequency_penalties(torch.zeros(1, 3), [[1, 7]], torch.tensor([1.0]), torch.tensor([0.0]))
    assert out.tolist() == [[0.0, -1.0, 0.0]]


def test_temperature_scales_each_row():
    out = apply_temperature(torch.tensor([[2.0, -4.0], [2.0, -4.0]]), torch.tensor([0.5, 2.0]))
    assert out.tolist() == [[4.0, -8.0], [1.0, -2.0]]


def test_min_p_threshold_is_relative_to_the_most_likely_token():
    logits = torch.tensor([log_probs(0.5, 0.3, 0.15, 0.05)] * 3)
    # thresholds: 0.2*0.5 = 0.1 drops 0.05; 0.7*0.5 = 0.35 keeps only 0.5; 0 keeps all.
    out = apply_min_p(logits.clone(), torch.tensor([0.2, 0.7, 0.0]))
    assert kept(out) == [[0, 1, 2], [0], [0, 1, 2, 3]]
    assert torch.equal(out[2], logits[2])


def test_top_k_keeps_exactly_k_largest_per_row():
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    ks = [1, 5, 37]
    out = apply_top_k(logits.clone(), torch.tensor(ks))
    for r, k in enumerate(ks):
        idx = kept(out[r : r + 1])[0]
        assert len(idx) == k
        assert set(idx) == set(logits[r].topk(k).indices.tolist())
        assert torch.equal(out[r, idx], logits[r, idx])


def test_top_k_keeps_exactly_k_when_logits_tie():
    out = apply_top_k(torch.zeros(2, 10), torch.tensor([3, 7]))
    assert [len(k) for k in kept(out)] == [3, 7]


def test_top_p_keeps_smallest_prefix_reaching_p():
    # Probabilities deliberately out of vocab order: token 2 is most likely.
    probs = [0.15, 0.3, 0.5, 0.05]
    logits = torch.tensor([log_probs(*probs)] * 4)
    out = apply_top_p(logits.clone(), torch.tensor([0.4, 0.6, 0.9, 0.99]))
    assert [sorted(k) for k in kept(out)] == [[2], [1, 2], [0, 1, 2], [0, 1, 2, 3]]
    assert torch.equal(out[3], logits[3])


def reference_top_p(logits: torch.Tensor, p: float) -> set[int]:
    """Full sort, the textbook way, one row."""
    probs = torch.softmax(logits.double(), dim=0)
    order = probs.argsort(descending=True)
    keep, mass = [], 0.0
    for t in order.tolist():
        keep.append(t)
        mass += probs[t].item()
        if mass >= p:
            break
    return set(keep)


def test_top_p_matches_full_sort_when_the_nucleus_is_larger_than_the_first_candidates():
    torch.manual_seed(2)
    vocab = 20_000
    flat = torch.randn(vocab) * 0.05  # nucleus of ~18k tokens: needs every widening step
    peaked = torch.randn(vocab) * 4.0  # nucleus of a handful: fits the first candidates
    out = apply_top_p(torch.stack([flat, peaked]), torch.tensor([0.9, 0.9]))
    kept_flat, kept_peaked = (set(k) for k in kept(out))
    assert len(kept_flat) > 10_000 and len(kept_peaked) < 1024
    # Float32 vs float64 mass may disagree on the single boundary token.
    assert len(kept_flat ^ reference_top_p(flat, 0.9)) <= 1
    assert kept_peaked == reference_top_p(peaked, 0.9)


# --- the sampler end to end ---


def test_greedy_is_argmax():
    torch.manual_seed(3)
    logits = torch.randn(6, 50)
    rows = [row(temperature=0), row(temperature=0.8, top_k=1), row(temperature=0)] * 2
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.argmax(dim=1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_argmax_breaks_ties_and_nans_as_torch_does():
    # The all-greedy path takes numpy's argmax on CPU: first index on ties, a NaN wins, any row layout.
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    logits[1, [4, 9]] = 50.0
    logits[2, [7, 3]] = float("nan")
    logits[3] = float("-inf")
    for x in (logits, logits[::2], logits.t().contiguous().t()):
        with torch.inference_mode():
            out = Sampler()(x, [row(temperature=0)] * x.shape[0])
        assert out.token_ids == x.argmax(dim=1).tolist()


def test_penalties_apply_to_greedy_rows():
    logits = torch.tensor([[3.0, 2.9, 0.0]] * 4)
    rows = [
        row(prompt=[0], temperature=0, repetition_penalty=2.0),  # prompt counts for repetition: 1.5 < 2.9
        row(prompt=[0, 0, 0], temperature=0, presence_penalty=2.0),  # prompt does not count for presence
        row(output=[0], temperature=0, presence_penalty=0.2),
        row(output=[0, 0], temperature=0, frequency_penalty=0.1),
    ]
    assert Sampler()(logits, rows).token_ids == [1, 0, 1, 1]


@pytest.mark.parametrize(
    "batch",
    [
        [row(output=[1], temperature=0.5, top_k=5, top_p=0.8, min_p=0.1, presence_penalty=1.0),
         row(prompt=[2], repetition_penalty=1.3, temperature=0)],
        [row(temperature=0.5), row(top_p=0.5)],  # every row sampled: truncation runs on the whole batch
        [row(top_k=3, min_p=0.2), row(temperature=0)],  # a sampled subset is truncated
    ],
)
def test_sampler_does_not_modify_the_callers_logits(batch):
    torch.manual_seed(4)
    logits = torch.randn(2, 30)
    before = logits.clone()
    Sampler()(logits, batch)
    assert torch.equal(logits, before)


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def assert_matches(tokens: list[int], expected: list[float]) -> None:
    """Every category within 5 standard errors of its expected frequency."""
    n = len(tokens)
    got = frequencies(tokens, len(expected))
    for g, p in zip(got.tolist(), expected):
        assert abs(g - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12, (got.tolist(), expected)


PROBS = [0.1, 0.2, 0.3, 0.4]
N_DRAWS = 20_000


def test_temperature_one_draws_match_the_distribution():
    torch.manual_seed(5)
    logits = torch.tensor([log_probs(*PROBS)]).expand(N_DRAWS, -1)
    tokens = Sampler()(logits, [row()] * N_DRAWS).token_ids
    assert_matches(tokens, PROBS)


def test_seeded_draws_match_the_distribution():
    logits = torch.tensor([log_probs(*PROBS)]).expand(N_DRAWS, -1)
    rows = [row(generator=make_generator(7, i), seed=7) for i in range(N_DRAWS)]
    assert_matches(Sampler()(logits, rows).token_ids, PROBS)


def test_draws_across_blocks_and_a_partial_last_block_match_the_distribution():
    # 700 tokens: blocks of 256, the last one partial; the mass sits in every block, at both ends of the
    # vocabulary, and -inf tokens lie between.
    vocab = 700
    probs = {0: 0.1, 255: 0.15, 256: 0.2, 511: 0.05, 600: 0.3, 699: 0.2}
    logits = torch.full((N_DRAWS, vocab), NEG_INF)
    for i, p in probs.items():
        logits[:, i] = math.log(p)
    u = torch.rand(N_DRAWS, dtype=torch.float64, generator=torch.Generator().manual_seed(11)).numpy()
    tokens = draw_from_softmax(logits, u)
    assert set(tokens) <= set(probs)
    assert_matches(tokens, [probs.get(i, 0.0) for i in range(vocab)])


def test_draw_ends_of_the_unit_interval_pick_the_first_and_last_tokens_with_weight():
    three = [[NEG_INF, 0.0, NEG_INF, 1.0, 2.0] + [NEG_INF] * 296] * 3
    logits = torch.tensor(three + [[NEG_INF] * 299 + [0.0, NEG_INF]])
    almost_one = math.nextafter(1.0, 0.0)
    first, last, middle, only = draw_from_softmax(logits, [0.0, almost_one, 0.5, almost_one])
    assert (first, last, only) == (1, 4, 299)
    assert middle == 4  # weights e^0, e^1, e^2: the first 0.5 of the mass ends inside token 4's share
    # A row with NaN logits still gets a token of the vocabulary, not an index error.
    nan_row = torch.tensor([[0.0, float("nan"), 1.0]])
    assert 0 <= draw_from_softmax(nan_row, [0.7])[0] < 3


def test_temperature_sharpens_the_distribution():
    torch.manual_seed(6)
    logits = torch.tensor([log_probs(*PROBS)]).expand(N_DRAWS, -1)
    tokens = Sampler()(logits, [row(temperature=0.5)] * N_DRAWS).token_ids
    squared = [p * p for p in PROBS]
    assert_matches(tokens, [s / sum(squared) for s in squared])


def test_top_k_renormalises_before_top_p():
    torch.manual_seed(7)
    n = 2_000
    logits = torch.tensor([log_probs(*PROBS)]).expand(n, -1)
    # top_k=2 keeps 0.4 and 0.3, renormalised to 4/7 and 3/7. Top-p 0.5 then stops after 4/7; had it seen the
    # unrenormalised 0.4 < 0.5 it would also keep token 2.
    tokens = Sampler()(logits, [row(top_k=2, top_p=0.5)] * n).token_ids
    assert set(tokens) == {3}
    logits = torch.tensor([log_probs(*PROBS)]).expand(N_DRAWS, -1)
    tokens = Sampler()(logits, [row(top_k=2)] * N_DRAWS).token_ids
    assert_matches(tokens, [0.0, 0.0, 3 / 7, 4 / 7])


def test_min_p_sees_the_temperature_scaled_distribution():
    torch.manual_seed(8)
    n = 2_000
    logits = torch.tensor([log_probs(0.6, 0.3, 0.1)]).expand(n, -1)
    # At T=1 min_p=0.3 drops 0.1 (< 0.18). At T=3 the probabilities flatten (0.1 becomes 0.55x the max), so it stays.
    assert 2 not in Sampler()(logits, [row(min_p=0.3)] * n).token_ids
    assert 2 in Sampler()(logits, [row(min_p=0.3, temperature=3.0)] * n).token_ids


def test_seeded_row_is_independent_of_batch_and_position():
    vocab, steps = 1000, 8
    torch.manual_seed(9)
    mine = [torch.randn(vocab) * 2 for _ in range(steps)]
    params = dict(temperature=0.9, top_p=0.95, top_k=300, min_p=0.01, repetition_penalty=1.1, seed=42)
    sampler = Sampler()

    alone, generator = [], make_generator(42)
    for t in range(steps):
        alone += sampler(mine[t].unsqueeze(0), [row(output=alone, generator=generator, **params)]).token_ids

    batched, generator = [], make_generator(42)
    other_generator = make_generator(42, 1)
    for t in range(steps):
        others = [
            (torch.randn(vocab) * 0.05, row(top_p=0.9)),  # flat: its top-p search widens, mine should not care
            (torch.randn(vocab), row(temperature=0)),
            (torch.randn(vocab), row(generator=other_generator, seed=42, top_k=3)),
        ][: t % 4]
        position = t % (len(others) + 1)
        entries = others[:position] + [(mine[t], row(output=batched, generator=generator, **params))] + others[position:]
        out = sampler(torch.stack([e[0] for e in entries]), [e[1] for e in entries])
        batched.append(out.token_ids[position])

    assert batched == alone
    assert len(set(alone)) > 1


def draw_sequence(seed: int, index: int, length: int = 16) -> list[int]:
    generator = make_generator(seed, index)
    logits = torch.zeros(1, 1000)
    return [Sampler()(logits, [row(generator=generator, seed=seed)]).token_ids[0] for _ in range(length)]


def test_same_seed_and_index_repeat_and_others_differ():
    assert draw_sequence(1, 0) == draw_sequence(1, 0)
    assert draw_sequence(1, 0) != draw_sequence(2, 0)
    assert draw_sequence(1, 0) != draw_sequence(1, 1)
    # Streams are not seed + index: sequence 1 of seed 1 is not sequence 0 of seed 2.
    assert draw_sequence(1, 1) != draw_sequence(2, 0)


def test_make_generator_is_a_cpu_generator():
    assert make_generator(0).device == torch.device("cpu")


def test_logprobs_are_raw_log_softmax_with_rank_and_top():
    logits = torch.tensor([[2.0, 1.9, 0.5, -1.0, 0.0]] * 3)
    rows = [
        # Greedy after the penalty picks token 1, so its rank under the raw model is 2.
        row(prompt=[0], temperature=0, repetition_penalty=2.0, logprobs=3),
        row(temperature=0, logprobs=0),
        row(temperature=0),
    ]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits[0], dim=0).tolist()
    assert out.token_ids == [1, 0, 0]
    first, second, third = out.logprobs
    assert isinstance(first, TokenLogprobs)
    assert (first.token_id, first.rank) == (1, 2)
    assert first.logprob == pytest.approx(raw[1], abs=1e-6)
    assert [t for t, _ in first.top] == [0, 1, 2]
    assert [lp for _, lp in first.top] == pytest.approx([raw[0], raw[1], raw[2]], abs=1e-6)
    assert (second.token_id, second.rank, second.top) == (0, 1, [])
    assert second.logprob == pytest.approx(raw[0], abs=1e-6)
    assert third is None


def test_logprobs_ignore_temperature_and_rank_matches_sorted_position():
    torch.manual_seed(10)
    logits = torch.randn(4, 64)
    out = Sampler()(logits, [row(temperature=1.7, top_k=20, logprobs=5)] * 4)
    for r, lp in enumerate(out.logprobs):
        raw = torch.log_softmax(logits[r], dim=0)
        assert lp.logprob == pytest.approx(raw[lp.token_id].item(), abs=1e-6)
        assert lp.rank == raw.argsort(descending=True).tolist().index(lp.token_id) + 1
        assert [t for t, _ in lp.top] == raw.topk(5).indices.tolist()


def test_half_precision_logits_are_accepted():
    logits = torch.tensor([[0.0, 5.0, 1.0]], dtype=torch.bfloat16)
    out = Sampler()(logits, [row(temperature=0, logprobs=1)])
    assert out.token_ids == [1] and out.logprobs[0].top[0][0] == 1


def test_empty_batch_and_shape_mismatch():
    assert Sampler()(torch.empty(0, 10), []).token_ids == []
    with pytest.raises(ValueError, match="len\\(rows\\)=1"):
        Sampler()(torch.zeros(2, 10), [row()])


def test_sampler_with_its_own_shared_generator_is_reproducible():
    logits = torch.zeros(3, 500)
    first = Sampler(generator=make_generator(3))(logits, [row()] * 3).token_ids
    again = Sampler(generator=make_generator(3))(logits, [row()] * 3).token_ids
    other = Sampler(generator=make_generator(4))(logits, [row()] * 3).token_ids
    assert first == again != other
