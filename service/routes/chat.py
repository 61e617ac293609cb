"""POST /v1/chat/completions and GET /v1/models, in OpenAI's protocol."""
import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from schemas.errors import DomainError
from schemas.openai import (AssistantMessage, ChatCompletion, ChatCompletionChunk,
                            ChatCompletionRequest, Choice, ChunkChoice, Delta, ErrorResponse,
                            ModelCard, ModelList, completion_id)
from schemas.records import ClientRef
from service.deps import CurrentKey, ServingDep
from service.engine import EngineError
from service.errors import ERROR_RESPONSES, ApiError, domain_error, engine_error, server_error
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


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(key: CurrentKey, serving: ServingDep) -> ModelList:
    """The served name (routed to the active version) and each version taking traffic."""
    created = lambda e: int(e.version.created_at.timestamp())
    cards = [ModelCard(id=serving.settings.model_name, created=created(serving.active))] if serving.ready else []
    cards += [ModelCard(id=e.version.name, created=created(e)) for e in serving.engines()]
    return ModelList(data=cards)


@router.post("/chat/completions", response_model=ChatCompletion,
             responses=CHAT_RESPONSES | {s: {"model": ErrorResponse} for s in (429, 503)})
async def create_chat_completion(body: ChatCompletionRequest, key: CurrentKey, serving: ServingDep,
                                 request: Request, client_ref: ClientRefHeader = None,
                                 client_chat: ClientChatHeader = None, client_task: ClientTaskHeader = None):
    """Answer with the served policy; the exchange is committed (or, while the database is away,
    spooled to disk) before the answer returns (streams: when they end, however they end). An
    engine that cannot take the request (its queue full, or no place in the batch before the
    deadline) answers 503 engine_overloaded with Retry-After, and nothing is recorded; a stream's
    headers wait for that decision."""
    engine = serving.pick(body.model)
    if engine is None and not serving.ready and body.model == serving.settings.model_name:
        raise ApiError(503, "No model is loaded yet; retry shortly.", code="model_not_ready",
                       headers={"Retry-After": "5"})
    if engine is None:
        raise ApiError(404, f"The model '{body.model}' does not exist or is not served.",
                       param="model", code="model_not_found")
    conversation = body.conversation()
    prompt_ids = await asyncio.get_running_loop().run_in_executor(TOKENIZER, engine.encode, conversation)
    room = engine.context_length - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {engine.context_length} tokens; "
                            f"your messages take {len(prompt_ids)}.", param="messages",
                       code="context_length_exceeded")
    sampling = body.to_sampling(serving.settings.default_max_tokens)
    sampling.max_tokens = min(sampling.max_tokens, room)  # the answer ends at the context's edge
    gen = engine.submit(prompt_ids, sampling, conversation)  # EngineOverloaded: 503 (service/errors.py)
    try:
        await gen.admitted()
    except BaseException:
        gen.cancel()  # the client left while it waited: it never runs
        raise
    client = ClientRef(client_ref=client_ref or None, client_chat_id=client_chat or None,
                       client_task=client_task or None)
    exchange = Exchange(completion_id(), body, key, engine, gen, conversation, client)
    if body.stream:
        return StreamingResponse(stream(exchange, request), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    try:
        await exchange.drain()
    except BaseException:
        exchange.gen.cancel()
        raise
    await request.app.state.recorder.record(exchange)
    return ChatCompletion(
        id=exchange.response_id, model=body.model, system_fingerprint=engine.version.name,
        choices=[Choice(index=i, message=AssistantMessage(content=t), finish_reason=f)
                 for i, (t, f) in enumerate(zip(exchange.texts, exchange.finish))],
        usage=exchange.usage())


async def stream(exchange: Exchange, request: Request):
    """SSE: a role delta per choice, content deltas, a finish per choice, optional usage, [DONE]."""
    created = int(time.time())

    def chunk(choices: list[ChunkChoice], usage=None) -> str:
        c = ChatCompletionChunk(id=exchange.response_id, created=created, model=exchange.body.model,
                                system_fingerprint=exchange.engine.version.name, choices=choices,
                                usage=usage)
        return f"data: {json.dumps(c.model_dump(mode='json'))}\n\n"

    recorder = request.app.state.recorder
    finished = False
    try:
        for i in range(exchange.gen.sampling.n):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async for piece in exchange.gen:
            exchange.add(piece)
            if piece.text:
                yield chunk([ChunkChoice(index=piece.index, delta=Delta(content=piece.text))])
            if piece.finish_reason in ("stop", "length"):
                yield chunk([ChunkChoice(index=piece.index, delta=Delta(),
                                         finish_reason=piece.finish_reason)])
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
