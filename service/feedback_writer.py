"""POST /v1/feedback in groups: the events that arrive together are written in one transaction.

Each caller is answered only after its group commits, so a 200 still means committed; a group
is one statement (`store.feedback.record_feedback_group`), so it costs Postgres one commit (one
WAL flush) and this process one round trip, where one transaction per event costs each of them
per event. What a group guarantees each event:

- its own answer: an unknown or someone else's completion, or a client's housekeeping call, is
  that event's 404 or 400 and writes nothing; the others are written;
- a database error in the group (a value the database refuses, a deadlock) rolled the whole
  transaction back, so nothing of it was written: each event is then written again in a
  transaction of its own, and only the event at fault fails;
- a connection lost in the middle leaves the outcome unknown, as it does for a single event:
  every event of the group is a 503, and a retry writes the same value again (a repeat of an
  unchanged value is no new event);
- two events on the same row (same completion, author and kind) are never in one group: the
  later is written after the group commits, in order, so each answer is its own write's.

Events with an Idempotency-Key take the one-transaction path of `routes/feedback.write_once`,
which stores the answer with the write."""

from schemas.errors import DomainError
from schemas.records import FeedbackPublic
from service.coalesce import Coalescer, each_alone_if_refused
from store import feedback
from store.db import Database
from store.feedback import FeedbackEvent


class FeedbackWriter:
    # Two groups in flight: one fills while the other commits. More lanes make smaller groups (more
    # CPU per event, measured) without more throughput on two cores.
    def __init__(self, db: Database, *, lanes: int = 2, max_group: int = 64):
        self.db = db
        self.groups = Coalescer(self._write, lanes=lanes, max_batch=max_group)

    async def __call__(self, event: FeedbackEvent) -> FeedbackPublic:
        """Write `event` with whatever else arrives now; its answer once committed, or its error."""
        return await self.groups(event)

    async def _write(self, events: list[FeedbackEvent]) -> list[FeedbackPublic | DomainError]:
        first, later, rows = [], [], set()
        for i, event in enumerate(events):
            (later if event.same_row() in rows else first).append(i)
            rows.add(event.same_row())
        results = dict(zip(first, await self._group([events[i] for i in first])))
        for i in later:
            results[i] = await self._alone(events[i])
        return [results[i] for i in range(len(events))]

    async def _group(self, events: list[FeedbackEvent]) -> list[FeedbackPublic | DomainError]:
        return await each_alone_if_refused(events, self._together, self._alone, "feedback events")

    async def _together(self, events: list[FeedbackEvent]) -> list[FeedbackPublic | DomainError]:
        async with self.db.connection() as conn:  # autocommit: the group's one statement is its transaction
            return await feedback.record_feedback_group(conn, events)

    async def _alone(self, event: FeedbackEvent) -> FeedbackPublic | DomainError:
        try:
            async with self.db.connection() as conn, conn.transaction():
                return await feedback.record_feedback(conn, feedback=event.feedback, author_key_id=event.author_key_id,
                                                      owned_by=event.owned_by)
        except DomainError as e:
            return e
