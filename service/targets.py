"""Where a version is served when inference servers generate, and the checks before it serves.

A policy version served remotely (FEEDLOOP_ENGINE=remote, or a version that names an endpoint)
has a target: the server's endpoint and the model id it is asked for. Unset parts take the
defaults: FEEDLOOP_REMOTE_URL, then FEEDLOOP_REMOTE_MODEL or else the checkpoint's path, which
servers that load models on demand by name (`transformers serve` without a forced model, vLLM
with its filesystem LoRA resolver) serve as it is.

Before anything switches to a version (promote, canary, rollback, or a new target for a version
that serves) the switch is prepared here, outside the registry's transaction and under the
`deploy` lock, so only one switch at a time is deployed:
  1. the deploy hook, FEEDLOOP_DEPLOY_COMMAND, for servers that must be told (a rollout, SGLang's
     update from disk, a vLLM adapter load, a blue/green restart); it fails or times out: refused;
  2. the target check: the server answers a warm-up request for the model id, and where it says
     what it serves under that id, that is this version's checkpoint.
Either refusal is a `TargetRefused` (409) with the reason, and the registry is not touched. Every
replica runs the same check when it loads the version (`RemoteEngine.warm`), so a version whose
target does not answer as it is never serves, however it was promoted.
"""
import asyncio
import logging
import os
import signal
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx

from schemas.checkpoint import BadCheckpoint, read_manifest
from schemas.errors import Conflict
from schemas.records import ModelVersion
from schemas.settings import Settings
from store import locks, registry

log = logging.getLogger(__name__)
OUTPUT_TAIL = 2000  # characters of a hook's output kept in a refusal


class TargetRefused(Conflict):
    """The version's target is not ready to serve it; nothing was switched."""
    code = "target_refused"


@dataclass(frozen=True)
class Target:
    endpoint: str
    """the server's base URL (`http://host:port`, or ending in `/v1`)"""
    model_id: str
    """the `model` it is asked for"""


def served_remotely(version: ModelVersion, settings: Settings) -> bool:
    return version.kind == "policy" and (settings.engine == "remote" or version.endpoint is not None)


def target_of(version: ModelVersion, settings: Settings) -> Target | None:
    """The version's target with the defaults filled in; None when it is served in-process."""
    if not served_remotely(version, settings):
        return None
    endpoint = version.endpoint or settings.remote_url
    if not endpoint:
        raise TargetRefused(f"{version.name} names no endpoint and FEEDLOOP_REMOTE_URL is unset",
                            code="no_endpoint")
    return Target(endpoint, version.model_id or settings.remote_model or version.path)


def _url(endpoint: str, route: str) -> str:
    """`route` under the server's OpenAI prefix, as `huggingface_hub` builds the chat URL."""
    parsed = urlparse(endpoint)
    path = parsed.path.rstrip("/")
    return urlunparse(parsed._replace(path=(path if path.endswith("/v1") else path + "/v1") + route))


# --- the target check ---------------------------------------------------------------------

def check_target(version: ModelVersion, target: Target, *, api_key: str | None = None,
                 timeout: float = 120.0) -> None:
    """Blocking: the server at `target` answers a warm-up request for its model id, and what it
    says it serves under that id is `version`'s checkpoint. Raises TargetRefused with the reason."""
    where = f"{target.endpoint} (model id {target.model_id!r})"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=timeout, trust_env=False) as http:
        try:
            r = http.post(_url(target.endpoint, "/chat/completions"), json={
                "model": target.model_id, "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 1, "temperature": 0})
        except httpx.HTTPError as e:
            raise TargetRefused(f"{version.name}'s target {where} does not answer: "
                                f"{type(e).__name__}: {e}", code="target_unreachable") from e
        if r.status_code != 200:
            raise TargetRefused(f"{version.name}'s target {where} answered the warm-up with "
                                f"{r.status_code}: {r.text[:300]}", code="target_refused")
        try:
            if not r.json()["choices"]:
                raise ValueError("no choices")
        except (ValueError, KeyError, TypeError) as e:
            raise TargetRefused(f"{version.name}'s target {where} answered the warm-up without a "
                                f"completion: {r.text[:300]}") from e
        try:
            listed = http.get(_url(target.endpoint, "/models"))
            models = listed.json()["data"] if listed.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            models = None  # a server that lists nothing says nothing about what it serves
    problem = _listing_problem(version, target, models) or _model_id_problem(version, target.model_id)
    if problem:
        raise TargetRefused(f"{version.name}'s target {where} {problem}", code="target_mismatch")


def _listing_problem(version: ModelVersion, target: Target, models: list | None) -> str | None:
    """What the server's model list says against `version`, or None. The entry for the model id
    may name what it serves as `root` (vLLM, SGLang: the path loaded); a server that does not list
    the model id but lists one model answers every name with that one (TGI)."""
    if not models:
        return None  # says nothing
    entries = [m for m in models if isinstance(m, dict)]
    entry = next((m for m in entries if m.get("id") == target.model_id), None)
    if entry is not None:
        root = entry.get("root")
        if not isinstance(root, str) or root == target.model_id:
            return None  # it serves the name asked for (a model id that is a path is checked next)
        return _reported_problem(version, root, "serves {name} under that id")
    if len(entries) == 1 and isinstance(entries[0].get("id"), str):
        return _reported_problem(version, entries[0]["id"], "does not list that id but serves {name} for any name")
    listed = ", ".join(str(m.get("id")) for m in entries[:5])
    return f"does not list that model id (it lists {listed}), so it would not answer as {version.name}"


def _reported_problem(version: ModelVersion, name: str, says: str) -> str | None:
    """A model the server says it serves must be the checkpoint: the same path, or a directory
    here whose manifest has the version's content hash."""
    if _same_path(name, version.path):
        return None
    if Path(name).is_dir():
        return _manifest_problem(version, name)
    return (says.format(name=name) + f", which is not {version.name}'s checkpoint {version.path} (where "
            "the server mounts checkpoints elsewhere, make the model id the path it loads)")


def _model_id_problem(version: ModelVersion, model_id: str) -> str | None:
    """A model id that is a directory here (a server loading by path reads it) must hold the
    checkpoint; any other name cannot be compared."""
    if _same_path(model_id, version.path) or not model_id.startswith("/") or not Path(model_id).is_dir():
        return None
    return _manifest_problem(version, model_id)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _manifest_problem(version: ModelVersion, path: str) -> str | None:
    try:
        found = read_manifest(Path(path), verify=False).get("content_hash")
    except BadCheckpoint:
        return f"loads {path}, which is not a checkpoint (it has no manifest), not {version.name}'s"
    if found != version.content_hash:
        return (f"loads {path}, which holds checkpoint {str(found)[:19]}…, not {version.name}'s "
                f"{version.content_hash[:19]}…")
    return None


# --- the deploy hook ------------------------------------------------------------------------

async def run_deploy_hook(version: ModelVersion, target: Target, settings: Settings, *, action: str) -> None:
    """FEEDLOOP_DEPLOY_COMMAND through `sh -c`, with $1..$4 = version name, checkpoint path,
    endpoint, model id (and the same as FEEDLOOP_* variables). A non-zero exit or a run past
    FEEDLOOP_DEPLOY_TIMEOUT_SECONDS refuses the switch, with the tail of its output."""
    if not settings.deploy_command:
        return
    env = dict(os.environ, FEEDLOOP_VERSION=version.name, FEEDLOOP_VERSION_ID=str(version.id),
               FEEDLOOP_CHECKPOINT=version.path, FEEDLOOP_ENDPOINT=target.endpoint,
               FEEDLOOP_MODEL_ID=target.model_id, FEEDLOOP_ACTION=action)
    log.info("deploying %s (%s) to %s: %s", version.name, action, target.endpoint, settings.deploy_command)
    # Its output goes to a file, not a pipe: a server it starts in the background may keep a pipe
    # open forever, and the hook is done when it exits.
    with tempfile.TemporaryFile() as output:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", settings.deploy_command, "feedloop-deploy", version.name, version.path,
            target.endpoint, target.model_id, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=output, stderr=output, start_new_session=True)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), settings.deploy_timeout_seconds)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the hook and whatever it started
            except ProcessLookupError:
                pass
            await proc.wait()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise TargetRefused(f"the deploy hook for {version.name} ran past {settings.deploy_timeout_seconds:g} s "
                                f"and was killed; its output: {_tail(output)}", code="deploy_failed") from None
        if proc.returncode != 0:
            raise TargetRefused(f"the deploy hook for {version.name} failed (exit status {proc.returncode}); "
                                f"its output: {_tail(output)}", code="deploy_failed")
        log.info("deploy hook for %s done: %s", version.name, _tail(output, 300))


def _tail(output, limit: int = OUTPUT_TAIL) -> str:
    """The end of what was written to the file `output`, as text."""
    output.seek(max(0, output.seek(0, os.SEEK_END) - 4 * limit))
    text = output.read().decode(errors="replace").replace("\x00", "\ufffd").strip()
    return (text if len(text) <= limit else "…" + text[-limit:]) or "(none)"


# --- switches: prepared here, then one registry transaction -----------------------------------

async def prepare(version: ModelVersion, settings: Settings, *, action: str) -> Target | None:
    """Deploy and check `version`'s target (nothing for a version served in-process)."""
    target = target_of(version, settings)
    if target is None:
        return None
    await run_deploy_hook(version, target, settings, action=action)
    await asyncio.to_thread(check_target, version, target, api_key=settings.remote_api_key,
                            timeout=settings.target_timeout_seconds)
    return target


@asynccontextmanager
async def deploying(conn):
    """The `deploy` lock for one switch, or 409 when another one is being deployed."""
    async with locks.holding(conn, locks.DEPLOY) as got:
        if not got:
            raise Conflict("another switch (promote, canary, rollback or retarget) is being deployed; "
                           "try again when it is done", code="deploy_in_progress")
        yield


async def promote(conn, settings: Settings, *, id: int, actor: str, reason: str | None = None) -> ModelVersion:
    async with deploying(conn):
        version = await registry.get_model_version(conn, id=id)
        registry.check_promotable(version)
        await prepare(version, settings, action="promote")
        return await registry.promote(conn, id=id, actor=actor, reason=reason)


async def canary(conn, settings: Settings, *, id: int, fraction: float, actor: str,
                 reason: str | None = None) -> ModelVersion:
    async with deploying(conn):
        version = await registry.get_model_version(conn, id=id)
        registry.check_canary(version)
        await prepare(version, settings, action="canary")
        return await registry.canary(conn, id=id, fraction=fraction, actor=actor, reason=reason)


async def rollback(conn, settings: Settings, *, actor: str, kind: str = "policy", reason: str | None = None,
                   expect_active: int | None = None) -> ModelVersion:
    """Back to the version active before; with `expect_active`, only from that version."""
    async with deploying(conn):
        current, previous = await registry.rollback_target(conn, kind=kind)
        if expect_active is not None and current.id != expect_active:
            raise Conflict(f"version {expect_active} is not the active version", code="not_active")
        await prepare(previous, settings, action="rollback")
        return await registry.rollback(conn, kind=kind, actor=actor, reason=reason, to=previous.id)


UNCHANGED = object()


async def retarget(conn, settings: Settings, *, id: int, actor: str, endpoint=UNCHANGED, model_id=UNCHANGED,
                   reason: str | None = None) -> ModelVersion:
    """A new endpoint and/or model id for a version (None: back to the default). A version that
    serves (active, canary) is deployed and checked on its new target first."""
    async with deploying(conn):
        version = await registry.get_model_version(conn, id=id)
        changed = version.model_copy(update={
            "endpoint": version.endpoint if endpoint is UNCHANGED else endpoint,
            "model_id": version.model_id if model_id is UNCHANGED else model_id})
        if changed.status in ("active", "canary"):
            await prepare(changed, settings, action="retarget")
        return await registry.retarget(conn, id=id, endpoint=changed.endpoint, model_id=changed.model_id,
                                       actor=actor, reason=reason)
