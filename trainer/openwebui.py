"""Open WebUI's feedback into feedloop (`feedloop import openwebui`, and the trainer's scheduled job).

Open WebUI keeps its users' thumbs, 1-10 ratings, comments and side-by-side votes in its own
database, naming its own assistant message id. Its connection to feedloop sends that id with every
chat request (the X-Feedloop-Client-* headers, README "Using Open WebUI as the chat UI"), so each
feedback item joins the exchange that produced the message. Each item is recorded through the same
store functions as POST /v1/feedback and /v1/preferences, attributed to the Open WebUI user:
  data.rating +1 / -1          thumbs
  data.details.rating 1..10    a rating 1..7 (rescaled linearly: 1 -> 1, 10 -> 7)
  comment, reason, tags        one comment
  sibling_model_ids            a side-by-side vote: the rated answer preferred over (rating +1) or
                               below (rating -1) each sibling answer to the same message, strength 1
Recording is idempotent: the store keeps one current value per completion, author and kind (and one
preference per author and pair), so an edited item replaces its values and a repeat changes nothing.
Items whose message matches no recorded exchange (answered before the headers were set, by another
backend, or only a client's housekeeping call) are counted and listed, never guessed."""
import asyncio
import logging
from dataclasses import asdict, dataclass, field

import httpx
import psycopg

from schemas.errors import DomainError
from schemas.records import RATING_RANGE, CompletionRef, FeedbackCreate, PreferenceCreate
from store import exchanges, feedback, keys

log = logging.getLogger(__name__)
SOURCE = "openwebui"
OWUI_RATING_RANGE = (1, 10)  # Open WebUI's detailed rating
KINDS = ("thumbs", "rating", "comment", "preference")


@dataclass
class ImportReport:
    items: int = 0
    joined: int = 0
    # values recorded (written, or found as they were) and, of them, those new or changed by this import
    recorded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    changed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unjoined: list[dict] = field(default_factory=list)  # {"id", "message_id", "reason"}
    refused: list[dict] = field(default_factory=list)   # joined, but the store said no: {"id", "reason"}

    def as_dict(self) -> dict:
        return asdict(self) | {"unjoined_count": len(self.unjoined), "refused_count": len(self.refused)}


# --- reading Open WebUI ---------------------------------------------------------------------

def fetch_feedback(url: str, api_key: str, *, timeout: float = 30.0) -> list[dict]:
    """Every feedback item, paged through the admin list (30 a page); side-by-side votes are read
    whole (`/feedback/{id}`) for the chat snapshot that names the sibling answers."""
    items = []
    with httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"},
                      timeout=timeout) as client:
        page = 1
        while True:
            r = client.get("/api/v1/evaluations/feedbacks/list", params={"page": page})
            r.raise_for_status()
            body = r.json()
            items += body["items"]
            if not body["items"] or len(items) >= body["total"]:
                break
            page += 1
        for i, item in enumerate(items):
            if (item.get("data") or {}).get("sibling_model_ids"):
                r = client.get(f"/api/v1/evaluations/feedback/{item['id']}")
                r.raise_for_status()
                items[i] = r.json() | {"user": item.get("user")}
    return items


def _thumbs(data: dict) -> int | None:
    try:
        value = int(data.get("rating"))
    except (TypeError, ValueError):
        return None
    return value if value in (-1, 1) else None


def rescale_rating(value: int) -> int:
    """Open WebUI's 1..10 onto feedloop's 1..7 (InstructGPT's Likert), linearly, to the nearest."""
    (a, b), (lo, hi) = OWUI_RATING_RANGE, RATING_RANGE
    return lo + int((value - a) * (hi - lo) / (b - a) + 0.5)


def _rating(data: dict) -> int | None:
    value = (data.get("details") or {}).get("rating")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        return None
    return rescale_rating(int(value)) if OWUI_RATING_RANGE[0] <= value <= OWUI_RATING_RANGE[1] else None


def _comment(item: dict) -> str | None:
    """The item's words as one comment: the free text, the reason picked, the tags."""
    data, meta = item.get("data") or {}, item.get("meta") or {}
    tags = data.get("tags") or meta.get("tags") or []
    parts = [(data.get("comment") or "").strip(),
             f"reason: {data['reason']}" if data.get("reason") else "",
             f"tags: {', '.join(map(str, tags))}" if tags else ""]
    return "\n".join(p for p in parts if p) or None


def sibling_message_ids(item: dict) -> list[str]:
    """The other answers to the same user message, of the models the vote names, from the chat
    snapshot the item carries."""
    message_id = (item.get("meta") or {}).get("message_id")
    wanted = set((item.get("data") or {}).get("sibling_model_ids") or [])
    chat = ((item.get("snapshot") or {}).get("chat") or {}).get("chat") or {}
    messages = (chat.get("history") or {}).get("messages") or {}
    parent = messages.get((messages.get(message_id) or {}).get("parentId") or "", {})
    return [m for m in parent.get("childrenIds", []) if m != message_id
            and (messages.get(m) or {}).get("model") in wanted]


# --- recording ------------------------------------------------------------------------------

async def _exchange(conn, message_id: str | None) -> str | None:
    row = await exchanges.find_client_exchange(conn, client_ref=message_id) if message_id else None
    return row["response_id"] if row else None


async def record_item(conn, item: dict, report: ImportReport) -> None:
    """One feedback item, in one transaction (all of it or none)."""
    data, meta, user = item.get("data") or {}, item.get("meta") or {}, item.get("user") or {}
    message_id = meta.get("message_id")
    response_id = await _exchange(conn, message_id)
    if response_id is None:
        report.unjoined.append({"id": item["id"], "message_id": message_id,
                                "reason": "no recorded exchange has this message id"})
        return
    report.joined += 1
    thumbs, rating, comment = _thumbs(data), _rating(data), _comment(item)
    siblings = [(m, await _exchange(conn, m)) for m in sibling_message_ids(item)] if thumbs else []
    for m, rid in siblings:
        if rid is None:
            report.unjoined.append({"id": item["id"], "message_id": m,
                                    "reason": "the vote's sibling answer has no recorded exchange"})
    author = await keys.external_author(conn, source=SOURCE, person=item["user_id"],
                                        name=f"Open WebUI: {user.get('name') or item['user_id']}"
                                             + (f" <{user['email']}>" if user.get("email") else ""))
    this = CompletionRef(response_id=response_id)
    writes = [("thumbs", FeedbackCreate(response_id=response_id, kind="thumbs", value=thumbs)) if thumbs else None,
              ("rating", FeedbackCreate(response_id=response_id, kind="rating", value=rating)) if rating else None,
              ("comment", FeedbackCreate(response_id=response_id, kind="comment", text=comment)) if comment else None]
    for _, rid in siblings:
        if rid is not None:
            other = CompletionRef(response_id=rid)
            chosen, rejected = (this, other) if thumbs > 0 else (other, this)
            writes.append(("preference", PreferenceCreate(chosen=chosen, rejected=rejected, strength=1.0)))
    writes = [w for w in writes if w]
    changed = []
    try:
        async with conn.transaction():
            now = await feedback.transaction_time(conn)
            for kind, body in writes:
                if kind == "preference":
                    row = await feedback.record_preference(conn, preference=body, author_key_id=author, owned_by=None)
                else:
                    row = await feedback.record_feedback(conn, feedback=body, author_key_id=author, owned_by=None)
                changed.append(row.updated_at == now)
    except DomainError as e:
        report.refused.append({"id": item["id"], "reason": str(e)})
        return
    for (kind, _), new in zip(writes, changed):
        report.recorded[kind] += 1
        report.changed[kind] += new


async def import_feedback(db_url: str, items: list[dict]) -> ImportReport:
    report = ImportReport(items=len(items))
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        for item in items:
            if item.get("type", "rating") != "rating":
                report.unjoined.append({"id": item.get("id"), "message_id": None,
                                        "reason": f"not a rating item (type {item.get('type')!r})"})
                continue
            await record_item(conn, item, report)
    log.info("Open WebUI import: %d items, %d joined, %d unjoined, %d refused; recorded %s", report.items,
             report.joined, len(report.unjoined), len(report.refused), report.recorded)
    return report


async def run_import(db_url: str, url: str, api_key: str) -> ImportReport:
    items = await asyncio.to_thread(fetch_feedback, url, api_key)
    return await import_feedback(db_url, items)
