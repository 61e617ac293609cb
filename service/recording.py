"""Collect what a generation produced and commit it as an exchange: the request, the parameters
actually used, the version that answered, timings, and every choice.

An answer that is generated is never thrown away for want of a database: when the database cannot
take the exchange, it goes to a small durable spool (one file per exchange under
`$FEEDLOOP_HOME/spool`, fsynced and renamed into place before the answer is sent) and is
recorded from there as soon as the database is back, also after a restart or a crash. Recording
is idempotent by response id, so a spooled exchange two replicas drain is written once.

Exchanges that finish together are written together (service/coalesce.py), as feedback is: one
transaction, each exchange one statement, all pipelined, so a group costs one round trip and one
commit. Each request still answers only once its group committed. A group the database refuses
(an exchange recorded already, a value it will not take) rolled back whole, and each of its
exchanges is then written on its own."""
import asyncio
import logging
import os
from pathlib import Path

from schemas.errors import Conflict, DomainError, Unavailable
from schemas.openai import ChatCompletionRequest, Usage
from schemas.records import ApiKeyPublic, ClientRef, CompletionRecord, ExchangeCreate
from service.coalesce import Coalescer, each_alone_if_refused
from service.engine import Engine, Generation, Piece
from service.metrics import EXCHANGES, SPOOLED
from store import exchanges
from store.db import Database

log = logging.getLogger(__name__)


class Exchange:
    """One request in flight: its choices as they grow."""

    def __init__(self, response_id: str, body: ChatCompletionRequest, key: ApiKeyPublic,
                 engine: Engine, gen: Generation, conversation: list[dict], client: ClientRef | None = None):
        self.response_id, self.body, self.key, self.engine, self.gen = response_id, body, key, engine, gen
        self.conversation, self.client = conversation, client or ClientRef()
        n = gen.sampling.n
        self.texts, self.finish, self.tokens = [""] * n, [None] * n, [0] * n
        self.tool_calls: list[list[dict] | None] = [None] * n
        self.logprobs: list[list[dict] | None] = [[] if gen.sampling.logprobs is not None else None] * n

    def add(self, piece: Piece) -> None:
        self.texts[piece.index] += piece.text
        self.tokens[piece.index] = piece.tokens
        if piece.logprobs and self.logprobs[piece.index] is not None:
            self.logprobs[piece.index] = self.logprobs[piece.index] + piece.logprobs
        if piece.finish_reason:
            self.finish[piece.index] = piece.finish_reason

    async def drain(self) -> None:
        async for piece in self.gen:
            self.add(piece)

    def usage(self) -> Usage:
        prompt, completion = len(self.gen.prompt_ids), sum(self.tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def to_record(self) -> ExchangeCreate:
        version = self.engine.version
        return ExchangeCreate(
            response_id=self.response_id, api_key_id=self.key.id, user=self.body.user,
            messages=self.conversation, params=self.gen.sampling.model_dump(), model_version_id=version.id,
            stream=self.body.stream, batch_rows=self.gen.batch_rows, prompt_tokens=len(self.gen.prompt_ids),
            **self.gen.timings(), **self.client.model_dump(),
            choices=[CompletionRecord(choice_index=i, text=t, finish_reason=f, completion_tokens=k,
                                      model_version_id=version.id, tool_calls=c, logprobs=lp)
                     for i, (t, f, k, c, lp) in enumerate(zip(self.texts, self.finish, self.tokens,
                                                              self.tool_calls, self.logprobs))])


class Spool:
    """Exchanges answered while the database was away, one JSON file each, at most `limit`."""

    def __init__(self, directory: Path, limit: int):
        self.dir, self.limit = directory, limit
        self.dir.mkdir(parents=True, exist_ok=True)
        for partial in self.dir.glob(".*.tmp"):  # a write a crash cut short was never acknowledged
            partial.unlink(missing_ok=True)
        self.ids = {p.stem for p in self.dir.glob("*.json")}

    def put(self, record: ExchangeCreate) -> bool:
        """Keep `record` on disk for good (blocking); False when the spool is full."""
        if len(self.ids) >= self.limit:
            return False
        final = self.dir / f"{record.response_id}.json"
        tmp = self.dir / f".{record.response_id}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(record.model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)
        self.ids.add(record.response_id)
        return True

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.ids.discard(path.stem)


class Recorder:
    """Records exchanges: at once when it can, through the spool when the database is away.
    Also finishes exchanges whose client left: drains what the engine still sends after the
    cancel, then records it, detached from the request so the disconnect cannot cancel it.
    Shutdown waits for what is pending."""

    def __init__(self, db: Database, spool: Spool):
        self.db, self.spool, self.pending = db, spool, set()
        # Two groups in flight, one filling while the other commits (as FeedbackWriter's lanes).
        self.groups = Coalescer(self._write_group, lanes=2, max_batch=64)
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task | None = None
        db.on_recovered.append(self._wake.set)

    def start(self) -> None:
        self._drainer = asyncio.create_task(self._drain_forever())

    async def record(self, exchange: Exchange) -> None:
        """Committed, or kept in the spool; Unavailable only when neither could take it."""
        record = exchange.to_record()
        try:
            await self.groups(record)
        except Unavailable:
            if not await asyncio.to_thread(self.spool.put, record):
                raise
            SPOOLED.inc()
            log.warning("database away: exchange %s kept in the spool", record.response_id)
            self._wake.set()
        for f in exchange.finish:
            EXCHANGES.labels(version=exchange.engine.version.name, finish=f).inc()

    async def _write_group(self, records: list[ExchangeCreate]) -> list[None | Exception]:
        if len(records) == 1:
            return [await self._write_one(records[0])]
        return await each_alone_if_refused(records, self._write_together, self._write_one, "exchanges")

    async def _write_together(self, records: list[ExchangeCreate]) -> list[None]:
        await self.db.retrying(lambda conn: _insert(conn, records))
        return [None] * len(records)

    async def _write_one(self, record: ExchangeCreate) -> None | Exception:
        try:
            await self.db.retrying(lambda conn: _insert(conn, [record]))
        except Exception as e:  # this exchange's own outcome (Unavailable: the caller spools it)
            return e
        return None

    def is_spooled(self, response_id: str) -> bool:
        return response_id in self.spool.ids

    def finish_later(self, exchange: Exchange) -> None:
        task = asyncio.create_task(self._finish(exchange))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _finish(self, exchange: Exchange) -> None:
        try:
            await exchange.drain()
            await self.record(exchange)
        except Exception:
            log.exception("could not record exchange %s", exchange.response_id)

    async def drain_spool(self) -> int:
        """Record what the spool holds, oldest first; stops at the first sign the database is away."""
        done = 0
        for path in await asyncio.to_thread(self.spool.files):
            try:
                record = ExchangeCreate.model_validate_json(await asyncio.to_thread(path.read_bytes))
            except (OSError, ValueError) as e:
                log.error("spooled exchange %s is unreadable (%s); moved aside", path.name, e)
                path.rename(path.with_suffix(".unreadable"))
                self.spool.ids.discard(path.stem)
                continue
            try:
                await self.db.retrying(lambda conn: _insert(conn, [record]))
            except Unavailable:
                break
            except DomainError as e:  # the database refuses it for good: keep it for a person
                log.error("spooled exchange %s was refused (%s); moved aside", path.name, e)
                path.rename(path.with_suffix(".refused"))
                self.spool.ids.discard(path.stem)
                continue
            self.spool.remove(path)
            done += 1
        if done:
            log.info("recorded %d spooled exchanges", done)
        return done

    async def _drain_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=5)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self._drain_if_due("draining the spool failed; trying again later")

    async def wait(self) -> None:
        await self.groups.wait()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        if self._drainer is not None:
            self._drainer.cancel()
        await self._drain_if_due("could not drain the spool at shutdown; the next start will")

    async def _drain_if_due(self, failure: str) -> None:
        """Drain the spool when it holds exchanges and the database is back; a failure is logged
        (`failure`), not raised: the spool keeps them for the next try."""
        if self.spool.ids and self.db.available:
            try:
                await self.drain_spool()
            except Exception:
                log.exception(failure)


async def _insert(conn, records: list[ExchangeCreate]) -> None:
    """Write `records` in one transaction; a single one recorded already is no error."""
    try:
        if len(records) == 1:  # one statement is its own transaction (the pool's connections autocommit)
            await exchanges.record_exchanges(conn, records)
            return
        async with conn.pipeline(), conn.transaction():  # BEGIN travels with the first statement
            await exchanges.record_exchanges(conn, records)
    except Conflict as e:
        if e.code != "already_exists" or len(records) > 1:
            raise
        # recorded already: a retry after a commit whose answer was lost, or another drainer
