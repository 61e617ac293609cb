"""The clients agents are built with, against a real server: LangChain's ChatOpenAI (bind_tools,
with_structured_output in its default and function-calling modes), LiteLLM, and the OpenAI
Agents SDK running a function tool. Tool calls that must happen are asked for with a required or
named tool_choice (the bootstrap policy is too small to choose one reliably on its own); the
follow-up turn with the tool's result is answered."""
import json
import os
from typing import Literal

import pytest
from pydantic import BaseModel, Field

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM fetches nothing at import

CITIES = Literal["Paris", "Rome"]


class Capital(BaseModel):
    """The capital city of a country."""
    city: CITIES = Field(description="the city")
    sure: bool


def get_weather(city: CITIES) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


@pytest.fixture
def chat_model(server, user_key):
    from langchain_openai import ChatOpenAI
    # No max_tokens: the answer may take the room the prompt leaves (a tool's schema takes ~130 of
    # the bootstrap's 256 positions; asking for more than is left would be a 400).
    return ChatOpenAI(model="feedloop", base_url=server.url + "/v1", api_key=user_key, max_retries=0,
                      temperature=0.8, seed=1)


def test_langchain_bind_tools_and_the_tool_result_turn(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage
    bound = chat_model.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Paris?")
    ai = bound.invoke([question])
    assert len(ai.tool_calls) == 1 and ai.tool_calls[0]["name"] == "get_weather"
    assert ai.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
    result = ToolMessage(get_weather(**ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"])
    follow = chat_model.bind_tools([get_weather]).invoke([question, ai, result])
    assert follow.content or follow.tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(chat_model, method):
    kw = {} if method == "json_schema" else {"method": method}  # json_schema is langchain-openai's default
    answer = chat_model.with_structured_output(Capital, **kw).invoke("What is the capital of France?")
    assert isinstance(answer, Capital) and answer.city in ("Paris", "Rome")


def test_litellm_tool_call_and_follow_up(server, user_key):
    import litellm
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                       "required": ["city"]}}}]
    kw = dict(model="openai/feedloop", api_base=server.url + "/v1", api_key=user_key)
    messages = [{"role": "user", "content": "What is the weather in Rome?"}]
    r = litellm.completion(messages=messages, tools=tools, tool_choice="required", **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": get_weather(**json.loads(call.function.arguments))}]
    follow = litellm.completion(messages=messages, tools=tools, **kw)
    assert follow.choices[0].message.content or follow.choices[0].message.tool_calls
    structured = litellm.completion(messages=[{"role": "user", "content": "Capital of France?"}],
                                    response_format=Capital, **kw)
    assert Capital.model_validate_json(structured.choices[0].message.content).city in ("Paris", "Rome")


def test_agents_sdk_runs_a_function_tool(server, user_key):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                        set_tracing_disabled)
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    called = []

    @function_tool
    def weather(city: CITIES) -> str:
        """The weather in a city."""
        called.append(city)
        return get_weather(city)

    model = OpenAIChatCompletionsModel(model="feedloop", openai_client=AsyncOpenAI(
        base_url=server.url + "/v1", api_key=user_key, max_retries=0))
    # required for the first turn; the SDK resets tool_choice after a tool ran (reset_tool_choice),
    # so the turn with the tool's result is answered in text.
    agent = Agent(name="weather", instructions="Answer briefly.", model=model, tools=[weather],
                  model_settings=ModelSettings(tool_choice="required", temperature=0.8))
    result = Runner.run_sync(agent, "Weather in Paris?", max_turns=4)
    assert called and called[0] in ("Paris", "Rome")
    assert isinstance(result.final_output, str)
