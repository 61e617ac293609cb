"""The remote engine: any server that speaks TGI's or OpenAI's chat protocol (TGI, vLLM, SGLang,
`transformers serve`, another feedloop) generates; this replica still owns the protocol, the
recording and the version bookkeeping. It talks through `huggingface_hub.AsyncInferenceClient`,
which appends `/v1/chat/completions` to the server's URL. `n > 1` is fanned out as n streams
(seeded `seed + i`), since several of those servers ignore `n`."""
import asyncio
import logging

from huggingface_hub import AsyncInferenceClient, InferenceClient
from transformers import AutoConfig

from lm.chat import context_length, encode_prompt
from lm.checkpoint import load_tokenizer
from schemas.openai import SamplingParams
from schemas.records import ModelVersion
from service.engine import Generation, Piece

log = logging.getLogger(__name__)


class RemoteEngine:
    def __init__(self, version: ModelVersion, *, url: str, model: str | None = None,
                 api_key: str | None = None, timeout: float = 120):
        if not url:
            raise ValueError(f"{version.name} has no endpoint and FEEDLOOP_REMOTE_URL is unset")
        self.version, self.url, self.model, self.api_key = version, url, model, api_key
        # The checkpoint's tokenizer: context checks and token counts without a round trip.
        self.tokenizer = load_tokenizer(version.path)
        self.context_length = context_length(AutoConfig.from_pretrained(version.path))
        self._client = AsyncInferenceClient(base_url=url, api_key=api_key, timeout=timeout)
        self._tasks: set[asyncio.Task] = set()

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        return encode_prompt(self.tokenizer, conversation)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, conversation: list[dict]) -> Generation:
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
                conversation, model=self.model, stream=True, max_tokens=p.max_tokens,
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
        except Exception as e:
            log.warning("remote generation on %s failed: %s", self.url, e)
            gen.push(e)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def warm(self) -> None:
        """One tiny request: the server is there and answers (blocking)."""
        InferenceClient(base_url=self.url, api_key=self.api_key, timeout=60).chat_completion(
            [{"role": "user", "content": "Hello"}], model=self.model, max_tokens=1)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
