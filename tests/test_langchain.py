"""langchain-openai's ChatOpenAI against `jisu serve` on the default model: bound tools, tool results, and
structured output by function calling, by JSON schema and in JSON mode (all three of with_structured_output's methods)."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_openai")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from jisu.server.app import create_app  # noqa: E402
from jisu.server.serve import ServerThread  # noqa: E402

pytestmark = pytest.mark.real_model


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="The city, e.g. Paris")


class Add(BaseModel):
    """Add two integers."""

    a: int
    b: int


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str
    age: int


ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def chat(real_llm):
    with ServerThread(create_app(real_llm.engine, model_name="smollm2")) as url:
        yield ChatOpenAI(base_url=url + "/v1", api_key="x", model="smollm2", temperature=0, max_tokens=48,
                         max_retries=0, timeout=120)


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any", "required"])
def test_bind_tools_returns_tool_calls(chat, tool_choice):
    msg = chat.bind_tools([GetWeather, Add], tool_choice=tool_choice).invoke(ASK)
    assert isinstance(msg, AIMessage) and msg.tool_calls and not msg.invalid_tool_calls
    for call in msg.tool_calls:
        assert call["name"] in ("GetWeather", "Add") and call["id"].startswith("call_")
        (GetWeather if call["name"] == "GetWeather" else Add).model_validate(call["args"])
    if tool_choice == "GetWeather":
        assert [c["name"] for c in msg.tool_calls] == ["GetWeather"] and msg.tool_calls[0]["args"]["city"] == "Paris"


def test_streamed_tool_calls_match(chat):
    bound = chat.bind_tools([GetWeather, Add], tool_choice="GetWeather")
    whole = bound.invoke(ASK)
    merged = None
    for chunk in bound.stream(ASK):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]


def test_tool_result_round_trip(chat):
    bound = chat.bind_tools([GetWeather])
    call = chat.bind_tools([GetWeather], tool_choice="GetWeather").invoke(ASK)
    history = [HumanMessage(ASK), call, ToolMessage("22 C and sunny", tool_call_id=call.tool_calls[0]["id"])]
    answer = bound.invoke(history)
    assert isinstance(answer, AIMessage) and (answer.content or answer.tool_calls)


def test_structured_output_by_function_calling(chat):
    person = chat.with_structured_output(Person, method="function_calling").invoke(
        "Alice is 30 years old. Extract the person.")
    assert isinstance(person, Person) and person.name and isinstance(person.age, int)


def test_structured_output_by_json_schema(chat):
    person = chat.with_structured_output(Person, method="json_schema").invoke(
        "Alice is 30 years old. Extract the person.")
    assert isinstance(person, Person) and person.name and isinstance(person.age, int)


def test_structured_output_by_json_mode(chat):
    # json_mode sends response_format json_object: any JSON object, parsed by langchain into a dict.
    roomy = chat.model_copy(update={"max_tokens": 200})  # a free-form object needs more than a call's arguments
    out = roomy.with_structured_output(None, method="json_mode").invoke(
        "Alice is 30 years old. Give a JSON object with her name and age.")
    assert isinstance(out, dict) and out
