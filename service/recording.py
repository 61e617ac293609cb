"""Collect what a generation produced and commit it as an exchange: the request, the parameters
actually used, the version that answered, timings, and every choice."""
import asyncio
import logging

from psycopg_pool import AsyncConnectionPool

from schemas.openai import ChatCompletionRequest, Usage
from schemas.records import ApiKeyPublic, CompletionRecord
from service.engine import Engine, Generation, Piece
from service.metrics import EXCHANGES
from store import exchanges

log = logging.getLogger(__name__)


class Exchange:
    """One request in flight: its choices as they grow."""

    def __init__(self, response_id: str, body: ChatCompletionRequest, key: ApiKeyPublic,
                 engine: Engine, gen: Generation, conversation: list[dict]):
        self.response_id, self.body, self.key, self.engine, self.gen = response_id, body, key, engine, gen
        self.conversation = conversation
        n = gen.sampling.n
        self.texts, self.finish, self.tokens = [""] * n, [None] * n, [0] * n

    def add(self, piece: Piece) -> None:
        self.texts[piece.index] += piece.text
        self.tokens[piece.index] = piece.tokens
        if piece.finish_reason:
            self.finish[piece.index] = piece.finish_reason

    async def drain(self) -> None:
        async for piece in self.gen:
            self.add(piece)

    def usage(self) -> Usage:
        prompt, completion = len(self.gen.prompt_ids), sum(self.tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def record(self, pool: AsyncConnectionPool) -> None:
        version = self.engine.version
        choices = [CompletionRecord(choice_index=i, text=t, finish_reason=f, completion_tokens=k,
                                    model_version_id=version.id)
                   for i, (t, f, k) in enumerate(zip(self.texts, self.finish, self.tokens))]
        async with pool.connection() as conn, conn.transaction():
            await exchanges.record_exchange(
                conn, response_id=self.response_id, api_key_id=self.key.id, user=self.body.user,
                messages=self.conversation, params=self.gen.sampling.model_dump(),
                model_version_id=version.id, stream=self.body.stream, batch_rows=self.gen.batch_rows,
                prompt_tokens=len(self.gen.prompt_ids), **self.gen.timings(), choices=choices)
        for f in self.finish:
            EXCHANGES.labels(version=version.name, finish=f).inc()


class Recorder:
    """Finishes exchanges whose client left: drains what the engine still sends after the
    cancel, then records it. Runs detached from the request so the disconnect cannot cancel it;
    shutdown waits for what is pending."""

    def __init__(self, pool: AsyncConnectionPool):
        self.pool, self.pending = pool, set()

    def finish_later(self, exchange: Exchange) -> None:
        task = asyncio.create_task(self._finish(exchange))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _finish(self, exchange: Exchange) -> None:
        try:
            await exchange.drain()
            await exchange.record(self.pool)
        except Exception:
            log.exception("could not record exchange %s", exchange.response_id)

    async def wait(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
