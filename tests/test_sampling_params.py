import dataclasses

import pytest

from jisu.errors import InvalidRequestError
from jisu.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.ignore_eos, p.logprobs) == (None, 16, False, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.greedy and not p.needs_penalties


def test_boundary_values_are_accepted():
    p = SamplingParams(
        n=3, temperature=0, top_p=1e-9, top_k=-1, min_p=1, repetition_penalty=1e-3,
        presence_penalty=-2, frequency_penalty=2, seed=-5, max_tokens=None, logprobs=MAX_LOGPROBS,
    )
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(top_p=1).top_p == 1.0
    assert SamplingParams(max_tokens=1).max_tokens == 1


# (field, bad value, text the message must contain about what is allowed)
OUT_OF_RANGE = [
    ("n", 0, ">= 1"),
    ("n", -3, ">= 1"),
    ("temperature", -0.1, ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("top_k", -2, ">= 1"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("frequency_penalty", -3, "[-2, 2]"),
    ("frequency_penalty", 2.01, "[-2, 2]"),
    ("max_tokens", -1, ">= 0"),
    ("logprobs", -1, "[0, 20]"),
    ("logprobs", 21, "[0, 20]"),
]


@pytest.mark.parametrize("field, value, allowed", OUT_OF_RANGE)
def test_out_of_range_message_names_field_value_and_range(field, value, allowed):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(field + " ")
    assert repr(value) in message
    assert allowed in message


WRONG_TYPE = [
    ("n", 2.0),
    ("n", True),
    ("n", "2"),
    ("temperature", "hot"),
    ("temperature", True),
    ("temperature", None),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", float("nan")),
    ("top_p", [0.5]),
    ("top_k", 5.0),
    ("top_k", False),
    ("min_p", "0.1"),
    ("repetition_penalty", float("inf")),
    ("presence_penalty", "0"),
    ("frequency_penalty", None),
    ("seed", 1.5),
    ("seed", True),
    ("seed", "42"),
    ("max_tokens", 16.0),
    ("max_tokens", True),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("logprobs", True),
    ("logprobs", 2.0),
    ("stop", 5),
    ("stop", {"a": 1}),
    ("stop_token_ids", 7),
    ("stop_token_ids", "7"),
]


@pytest.mark.parametrize("field, value", WRONG_TYPE)
def test_wrong_type_message_names_field_and_value(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(field + " ")
    assert repr(value) in message
    assert "must be" in message


def test_invalid_request_error_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=[]).stop == []


@pytest.mark.parametrize("stop, bad_index, bad_value", [([""], 0, ""), (["ok", 3], 1, 3), (["ok", None], 1, None)])
def test_bad_stop_entries_are_named_by_index(stop, bad_index, bad_value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop=stop)
    assert str(info.value).startswith(f"stop[{bad_index}] ")
    assert repr(bad_value) in str(info.value)


def test_empty_stop_string_is_rejected():
    with pytest.raises(InvalidRequestError, match=r"^stop\[0\] must be a non-empty string"):
        SamplingParams(stop="")


def test_stop_token_ids_are_normalised():
    assert SamplingParams(stop_token_ids=(2, 0)).stop_token_ids == [2, 0]
    assert isinstance(SamplingParams(stop_token_ids=(2,)).stop_token_ids, list)


@pytest.mark.parametrize("ids, bad_index", [([1, -1], 1), ([True], 0), ([3, 4.0], 1)])
def test_bad_stop_token_ids_are_named_by_index(ids, bad_index):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop_token_ids=ids)
    assert str(info.value).startswith(f"stop_token_ids[{bad_index}] ")
    assert ">= 0" in str(info.value)


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy
    assert not SamplingParams(temperature=0.7, top_k=-1).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_needs_penalties():
    assert not SamplingParams(temperature=0).needs_penalties
    assert SamplingParams(repetition_penalty=1.1).needs_penalties
    assert SamplingParams(presence_penalty=0.5).needs_penalties
    assert SamplingParams(frequency_penalty=-0.5).needs_penalties


def test_replace_revalidates():
    p = SamplingParams(temperature=0.5)
    with pytest.raises(InvalidRequestError, match="^temperature "):
        dataclasses.replace(p, temperature=-1)
