"""POST /v1/chat/completions, GET /v1/models and /v1/models/{model}, in OpenAI's protocol."""
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from schemas.errors import DomainError
from schemas.openai import (AssistantMessage, ChatCompletion, ChatCompletionChunk,
                            ChatCompletionRequest, Choice, ChoiceLogprobs, ChunkChoice, Delta,
                            DeltaToolCall, ErrorResponse, ModelCard, ModelList, TokenLogprob,
                            completion_id, completion_time)
from schemas.records import ClientRef
from service.deps import CurrentKey, ServingDep
from service.engine import EngineClosed, EngineError
from service.errors import ERROR_RESPONSES, ApiError, domain_error, engine_error, server_error
from service import structured
from service.recording import Exchange

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["chat"])
# Tokenizing a long prompt takes a while (a megabyte: a third of a second): never on the event
# loop. One thread, so a tokenizer is never used by two threads at once.
TOKENIZER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
CHAT_RESPONSES = ERROR_RESPONSES | {200: {"content": {"text/event-stream": {
    "schema": {"type": "string", "description": "with stream=true: server-sent events, each "
               "`data: {chat.completion.chunk}`, then `data: [DONE]`"}}}}}


# What a chat client says of an exchange, recorded with it (schemas.records.ClientRef). Any client may
# send them; Open WebUI fills them from its connection's custom headers: {{MESSAGE_ID}}, {{CHAT_ID}},
# {{TASK}} (an empty value, as Open WebUI sends for a placeholder it has no value for, is none).
def _client_header(name: str, description: str):
    return Annotated[str | None, Header(alias=name, max_length=200, description=description)]


ClientRefHeader = _client_header("X-Feedloop-Client-Ref", "the client's own id for this answer (Open "
                                 "WebUI: the assistant message id its feedback names), to join feedback by")
ClientChatHeader = _client_header("X-Feedloop-Client-Chat", "the client's conversation id")
ClientTaskHeader = _client_header("X-Feedloop-Client-Task", "the client's task kind: empty for a user's "
                                  "turn; a client's housekeeping (titles, tags...) is never trained on")


TOOLS_OMITTED = "X-Feedloop-Tools-Omitted"  # set when tools on auto did not fit in the context


def model_cards(serving) -> list[ModelCard]:
    """The served name (routed to the active version) and each version taking traffic (one whose
    engine is being replaced after its process died included: it is back in seconds)."""
    def card(name, e):
        return ModelCard(id=name, created=int(e.version.created_at.timestamp()), context_length=e.context_length)
    cards = [card(serving.settings.model_name, serving.active)] if serving.active is not None else []
    return cards + [card(e.version.name, e) for e in serving.engines()]


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(key: CurrentKey, serving: ServingDep) -> ModelList:
    """The served name (routed to the active version) and each version taking traffic, with the
    context length (prompt plus answer) of each."""
    return ModelList(data=model_cards(serving))


@router.get("/models/{model}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, key: CurrentKey, serving: ServingDep) -> ModelCard:
    """One served name or version."""
    card = next((c for c in model_cards(serving) if c.id == model), None)
    if card is None:
        raise ApiError(404, f"The model '{model}' does not exist or is not served.", param="model",
                       code="model_not_found")
    return card


@router.post("/chat/completions", response_model=ChatCompletion,
             responses=CHAT_RESPONSES | {s: {"model": ErrorResponse} for s in (429, 503)})
async def create_chat_completion(body: ChatCompletionRequest, key: CurrentKey, serving: ServingDep,
                                 request: Request, response: Response, client_ref: ClientRefHeader = None,
                                 client_chat: ClientChatHeader = None, client_task: ClientTaskHeader = None):
    """Answer with the served policy; the exchange is committed (or, while the database is away,
    spooled to disk) before the answer returns (streams: when they end, however they end). An
    engine that cannot take the request (its queue full, or no place in the batch before the
    deadline) answers 503 engine_overloaded with Retry-After, and nothing is recorded; a stream's
    headers wait for that decision."""
    conversation = body.conversation()
    try:
        engine, plan, gen, headers = await submit_to_engine(body, serving, conversation)
    except EngineClosed:  # a swap retired the engine it chose meanwhile: the one serving now takes it
        engine, plan, gen, headers = await submit_to_engine(body, serving, conversation)
    try:
        await gen.admitted()
    except BaseException:
        gen.cancel()  # the client left while it waited: it never runs
        raise
    client = ClientRef(client_ref=client_ref or None, client_chat_id=client_chat or None,
                       client_task=client_task or None)
    exchange = Exchange(completion_id(), body, key, engine, gen, conversation, client)
    if body.stream:
        return StreamingResponse(stream(exchange, plan, request), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"} | headers)
    try:
        await exchange.drain()
    except BaseException:
        exchange.gen.cancel()
        raise
    messages = []
    for i, text in enumerate(exchange.texts):
        content, calls = plan.read(text)
        if calls:
            exchange.tool_calls[i], exchange.finish[i] = calls, "tool_calls"
        messages.append(AssistantMessage(content=content, tool_calls=calls or None))
    await request.app.state.recorder.record(exchange)
    response.headers.update(headers)
    return ChatCompletion(
        id=exchange.response_id, created=created(exchange), model=body.model,
        system_fingerprint=engine.version.name,
        choices=[Choice(index=i, message=m, finish_reason=f, logprobs=wire_logprobs(lp))
                 for i, (m, f, lp) in enumerate(zip(messages, exchange.finish, exchange.logprobs))],
        usage=exchange.usage())


async def submit_to_engine(body: ChatCompletionRequest, serving, conversation: list[dict]):
    """Choose the engine, plan and encode for it, check the room in its context, and submit:
    (engine, plan, generation, response headers)."""
    engine = serving.pick(body.model)
    if engine is None and not serving.ready and body.model == serving.settings.model_name:
        raise ApiError(503, "No model is loaded yet; retry shortly.", code="model_not_ready",
                       headers={"Retry-After": "5"})
    if engine is None:
        raise ApiError(404, f"The model '{body.model}' does not exist or is not served.",
                       param="model", code="model_not_found")
    loop = asyncio.get_running_loop()
    plan, prompt_ids = await loop.run_in_executor(TOKENIZER, planned, body, engine, conversation)
    asked = body.max_tokens_asked
    headers = {}
    if plan.tools and body.tool_mode == "auto" and len(prompt_ids) + (asked[1] if asked else 1) > engine.context_length:
        # The tool definitions leave no room in this model's context (chat UIs such as Open WebUI
        # attach dozens to every turn). On auto the model answers in text, as a model that cannot
        # call tools does; the header (and the recorded params, tools null) say so.
        plan, prompt_ids = await loop.run_in_executor(
            TOKENIZER, planned, body.model_copy(update={"tool_choice": "none"}), engine, conversation)
        headers[TOOLS_OMITTED] = "the tool definitions do not fit in the model's context"
    room = engine.context_length - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {engine.context_length} tokens; "
                            f"your messages take {len(prompt_ids)}.", param="messages",
                       code="context_length_exceeded")
    if asked and asked[1] > room:
        raise ApiError(400, f"This model's maximum context length is {engine.context_length} tokens; your "
                            f"messages take {len(prompt_ids)}, which leaves {room} for the answer, but "
                            f"{asked[0]} asks for {asked[1]}.", param=asked[0], code="context_length_exceeded")
    sampling = body.to_sampling(serving.settings.default_max_tokens)
    sampling.max_tokens = min(sampling.max_tokens, room)  # the default answer length ends at the context's edge
    sampling.grammar, sampling.tools = plan.grammar, plan.tools
    gen = engine.submit(prompt_ids, sampling, conversation)  # EngineOverloaded: 503 (service/errors.py)
    return engine, plan, gen, headers


def planned(body: ChatCompletionRequest, engine, conversation: list[dict]) -> tuple[structured.Plan, list[int]]:
    """The request's plan (its grammar compiled) and its prompt's tokens: one trip to the
    tokenizer's thread, since every hop between threads waits for the interpreter lock."""
    plan = structured.plan(body, engine)
    return plan, engine.encode(conversation, plan.tools)


def wire_logprobs(entries: list[dict] | None) -> ChoiceLogprobs | None:
    return None if entries is None else ChoiceLogprobs(content=[TokenLogprob(**e) for e in entries])


def created(exchange: Exchange) -> int:
    """OpenAI's `created`: the second the request came, which its response id carries (and the
    exchange is recorded at)."""
    return int(completion_time(exchange.response_id).timestamp())


async def stream(exchange: Exchange, plan: structured.Plan, request: Request):
    """SSE: a role delta per choice, content deltas (with their tokens' logprobs when asked), a
    choice's tool calls once it is whole, a finish per choice, optional usage, [DONE]."""
    def chunk(choices: list[ChunkChoice], usage=None) -> str:
        c = ChatCompletionChunk(id=exchange.response_id, created=created(exchange), model=exchange.body.model,
                                system_fingerprint=exchange.engine.version.name, choices=choices,
                                usage=usage)
        return f"data: {json.dumps(c.model_dump(mode='json'))}\n\n"

    recorder = request.app.state.recorder
    finished = False
    n = exchange.gen.sampling.n
    held = [structured.ToolCallText(plan) if plan.tool_format else None for _ in range(n)]
    try:
        for i in range(n):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async for piece in exchange.gen:
            exchange.add(piece)
            i, text, logprobs = piece.index, piece.text, wire_logprobs(piece.logprobs)
            finish = piece.finish_reason if piece.finish_reason in ("stop", "length") else None
            calls = []
            if held[i] is not None:
                text = held[i].feed(text)
                if finish:
                    rest, calls = held[i].finish()
                    text += rest
            if text or logprobs:
                yield chunk([ChunkChoice(index=i, delta=Delta(content=text), logprobs=logprobs)])
            if calls:
                exchange.tool_calls[i], exchange.finish[i] = calls, "tool_calls"
                finish = "tool_calls"
                yield chunk([ChunkChoice(index=i, delta=Delta(tool_calls=[
                    DeltaToolCall(index=k, **c) for k, c in enumerate(calls)]))])
            if finish:
                yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=finish)])
        finished = True
        await recorder.record(exchange)
        opts = exchange.body.stream_options
        if opts and opts.include_usage:
            yield chunk([], usage=exchange.usage())
        yield "data: [DONE]\n\n"
    except Exception as e:
        # The status line is sent: say what went wrong as OpenAI does mid-stream, an error
        # event, and end the stream cleanly (no [DONE]: the answer is not whole or not kept).
        if isinstance(e, EngineError):
            error, finished = engine_error(e), True  # the engine ended it: nothing more to drain or record
        elif isinstance(e, DomainError):
            error = domain_error(e)
        else:
            error = server_error()
            log.exception("stream %s failed", exchange.response_id)
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        if not finished:  # the client went away (or generation failed): stop, record what was produced
            exchange.gen.cancel()
            recorder.finish_later(exchange)
