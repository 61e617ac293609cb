"""The remote engine: any server that speaks TGI's or OpenAI's chat protocol (TGI, vLLM, SGLang,
`transformers serve`, another feedloop) generates; this replica still owns the protocol, the
recording and the version bookkeeping. One engine serves one version on one target (endpoint and
model id, service/targets.py), so everything it answers is that version's. It talks through
`huggingface_hub.AsyncInferenceClient`, which appends `/v1/chat/completions` to the server's URL.
`n > 1` is fanned out as n streams (seeded `seed + i`), since several of those servers ignore `n`.

Closing lets the requests in flight finish on this target (a swap: they are recorded with this
version); each stream is bounded by the client's timeout between chunks, so that ends. A stream
cancelled anyway (`close(grace=…)`) ends its request with an error, never leaves it waiting."""
import asyncio
import logging
from urllib.parse import urlparse

import httpx2
from huggingface_hub import AsyncInferenceClient, constants, set_async_client_factory
from huggingface_hub.errors import OfflineModeIsEnabled
from transformers import AutoConfig

from lm.chat import context_length, encode_prompt
from lm.checkpoint import load_tokenizer
from schemas.openai import SamplingParams
from schemas.records import ModelVersion
from service.engine import EngineClosed, EngineError, Generation, Piece
from service.targets import Target, check_target

log = logging.getLogger(__name__)


# `huggingface_hub`'s own sessions refuse every request under HF_HUB_OFFLINE, inference servers on
# our network included, though offline mode means "never reach the Hub" (and feedloop never
# downloads a model). Its sessions here block the Hub only, and keep reading error bodies.
async def _offline_means_the_hub(request: httpx2.Request) -> None:
    if constants.is_offline_mode() and request.url.host == urlparse(constants.ENDPOINT).hostname:
        raise OfflineModeIsEnabled(f"Cannot reach {request.url}: offline mode is enabled (HF_HUB_OFFLINE).")


async def _read_error_body(response: httpx2.Response) -> None:
    if response.status_code >= 400:
        await response.aread()  # so the raised error can quote what the server said


set_async_client_factory(lambda: httpx2.AsyncClient(
    event_hooks={"request": [_offline_means_the_hub], "response": [_read_error_body]},
    follow_redirects=True, timeout=None))


class RemoteEngine:
    lost, on_lost = None, None  # a server that fails fails its requests: it is not ours to restart

    def __init__(self, version: ModelVersion, *, target: Target, api_key: str | None = None,
                 timeout: float = 120, check_timeout: float = 120):
        self.version, self.target, self.api_key = version, target, api_key
        self.timeout, self.check_timeout = timeout, check_timeout
        # The checkpoint's tokenizer: context checks and token counts without a round trip.
        self.tokenizer = load_tokenizer(version.path)
        self.context_length = context_length(AutoConfig.from_pretrained(version.path))
        # Tools, grammars and log-probabilities are this replica's own (its decoding core); a
        # remote server is sent plain chats, so requests that need them are refused (400).
        self.tool_format, self.constraints = None, None
        self._client = AsyncInferenceClient(base_url=target.endpoint, api_key=api_key, timeout=timeout)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # where the streams run; close() comes from a thread
        self._closing = False

    def encode(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, conversation, tools)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, conversation: list[dict]) -> Generation:
        if self._closing:
            raise EngineClosed(f"{self.version.name} is closing")
        self._loop = asyncio.get_running_loop()
        gen = Generation(prompt_ids, sampling)
        gen.batch_rows = sampling.n
        gen.admit()  # the remote server queues (and refuses) on its own
        for index in range(sampling.n):
            task = asyncio.create_task(self._stream(gen, index, conversation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return gen

    async def _stream(self, gen: Generation, index: int, conversation: list[dict]) -> None:
        p = gen.sampling
        text, finish, streamed = "", None, 0
        try:
            chunks = await self._client.chat_completion(
                conversation, model=self.target.model_id, stream=True, max_tokens=p.max_tokens,
                temperature=p.temperature, top_p=p.top_p, stop=p.stop or None,
                seed=None if p.seed is None else p.seed + index)
            async for chunk in chunks:
                if gen.cancelled:
                    finish = "cancelled"
                    break
                if not chunk.choices:
                    continue
                delta = (chunk.choices[0].delta.content or "").replace("\x00", "\ufffd")  # see local_engine
                text += delta
                finish = chunk.choices[0].finish_reason or finish
                if delta:  # a chunk is about a token; the last piece's count, which is recorded, is exact
                    streamed += 1
                    gen.push([Piece(index, delta, None, streamed)])
            gen.push([Piece(index, "", finish if finish in ("stop", "length", "cancelled") else "stop",
                            self._count(text))])
        except asyncio.CancelledError:
            gen.push(EngineError(f"{self.version.name}'s engine was closed before this answer finished"))
            raise
        except Exception as e:
            log.warning("remote generation on %s failed: %s", self.target.endpoint, e)
            gen.push(e)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def warm(self) -> None:
        """The target check (blocking): the server answers for the model id, and what it says it
        serves under it is this version's checkpoint; raises TargetRefused otherwise."""
        check_target(self.version, self.target, api_key=self.api_key, timeout=self.check_timeout)

    def close(self, grace: float | None = None) -> None:
        """Blocking; call from a worker thread, not the event loop. Requests in flight finish
        (with `grace`, for at most that many seconds; what is left is cancelled and ends with an
        error), then the HTTP client is closed."""
        self._closing = True  # from now on a submission goes to the engine that replaced this one
        if self._loop is None or self._loop.is_closed():
            return  # never served a request: nothing is open
        asyncio.run_coroutine_threadsafe(self.aclose(grace), self._loop).result()

    async def aclose(self, grace: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        while live := {t for t in self._tasks if not t.done()}:
            _, pending = await asyncio.wait(live, timeout=None if deadline is None
                                            else max(0.0, deadline - loop.time()))
            for task in pending:  # only once the grace has run out
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._client.close()
