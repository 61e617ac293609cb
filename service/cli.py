"""`feedloop` — the command line. Serving commands run here; training commands are handed to
`python -m trainer` and `simulate` to `python -m sim`, each in a process of its own (the service,
the trainer and the simulator never import each other)."""
import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys

import psycopg

from schemas.errors import DomainError
from schemas.records import RATE_LIMIT_MAX
from schemas.settings import get_settings
from store import keys, registry
from store.db import database_url, migrate

log = logging.getLogger("feedloop")
TRAINER_COMMANDS = ("bootstrap", "train", "trainer", "import")
SIM_COMMANDS = ("simulate",)


def run_trainer(args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "trainer", *args])


def run_simulator(args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "sim", *args[1:]])


async def _with_conn(fn):
    async with await psycopg.AsyncConnection.connect(database_url(get_settings()), autocommit=True) as conn:
        return await fn(conn)


def cmd_migrate(args) -> None:
    applied = migrate(database_url(get_settings()))
    print(f"applied migrations: {applied}" if applied else "database is up to date")


def positive_int(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= RATE_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number up to {RATE_LIMIT_MAX}")
    return int(text)


def cmd_keys(args) -> None:
    migrate(database_url(get_settings()))
    if args.action == "create":
        key = asyncio.run(_with_conn(lambda c: keys.create_api_key(c, name=args.name, role=args.role,
                                                                     rate_limit=args.rate_limit)))
        print(json.dumps(key.model_dump(mode="json"), indent=2))
    elif args.action == "list":
        for k in asyncio.run(_with_conn(keys.list_api_keys)):
            state = "revoked" if k.revoked_at else "live"
            print(f"{k.id:>4}  {k.prefix}…  {k.role:<8}  {state:<7}  {k.name}")
    else:
        try:
            key = asyncio.run(_with_conn(lambda c: keys.revoke_api_key(c, id=args.id)))
        except DomainError as e:
            sys.exit(f"feedloop: {e}")
        print(f"revoked key {key.id} ({key.name})")


def cmd_models(args) -> None:
    """The registry from the command line: the same operations as /v1/admin/models, switches
    deployed and checked the same way (service/targets.py)."""
    from pydantic import ValidationError

    from schemas.records import TargetUpdate
    from service import model_import, targets

    settings = get_settings()
    migrate(database_url(settings))
    actor = f"cli:{os.environ.get('USER', 'operator')}"
    if args.action == "list":
        for v in asyncio.run(_with_conn(registry.list_model_versions)):
            lineage = f"parent {v.parent_id or '-'} ref {v.reference_id or '-'} rm {v.reward_model_id or '-'}"
            extra = f" {v.canary_fraction:.0%}" if v.status == "canary" else ""
            try:
                where = targets.target_of(v, settings)
                served = f"  on {where.endpoint} as {where.model_id}" if where else ""
            except targets.TargetRefused:
                served = "  on no endpoint (FEEDLOOP_REMOTE_URL is unset)"
            print(f"{v.name:>5}  {v.kind:<6}  {v.status + extra:<10}  {lineage:<24}  {v.path}{served}")
        return
    update = None
    if args.action in ("target", "register"):
        # "" returns a part to its default, as null does over HTTP
        given = {k: getattr(args, k) or None for k in ("endpoint", "model_id") if getattr(args, k) is not None}
        if args.action == "target" or given:
            try:
                update = TargetUpdate(**given, reason=args.reason)
            except ValidationError as e:
                sys.exit(f"feedloop: {e.errors()[0]['msg'].removeprefix('Value error, ')}")
    ops = {
        "promote": lambda c: targets.promote(c, settings, id=args.id, actor=actor, reason=args.reason),
        "rollback": lambda c: targets.rollback(c, settings, actor=actor, reason=args.reason),
        "canary": lambda c: targets.canary(c, settings, id=args.id, fraction=args.fraction, actor=actor,
                                           reason=args.reason),
        "reject": lambda c: registry.reject(c, id=args.id, actor=actor, reason=args.reason),
        "target": lambda c: targets.retarget(c, settings, id=args.id, actor=actor, reason=args.reason,
                                             **update.changes()),
        "register": lambda c: _register(c, args, update, actor),
        "verify": lambda c: registry.verify(c, id=args.id, actor=actor, reason=args.reason),
        "import": lambda c: model_import.import_policy(c, settings, path=args.path, actor=actor, reason=args.reason),
    }
    try:
        v = asyncio.run(_with_conn(ops[args.action]))
    except DomainError as e:
        sys.exit(f"feedloop: {e}")
    if args.action == "target":
        print(f"{v.name} is served on {v.endpoint or 'FEEDLOOP_REMOTE_URL'} as "
              f"{v.model_id or 'FEEDLOOP_REMOTE_MODEL or its path'}")
    else:
        print(f"{v.name} is {v.status}")


async def _register(conn, args, update, actor: str):
    """A published checkpoint (with its manifest) as a new version, with its serving target."""
    from pathlib import Path

    from schemas.checkpoint import BadCheckpoint

    target = update.changes() if update else {}
    try:
        async with conn.transaction():
            return await registry.register_checkpoint(conn, path=Path(args.path), kind=args.kind, status="candidate",
                                                      actor=actor, reason=args.reason, parent_id=args.parent, **target)
    except BadCheckpoint as e:
        sys.exit(f"feedloop: {e}")


def cmd_export(args) -> None:
    """The derived training data as JSONL in TRL's formats: the same rows as GET /v1/admin/export."""
    from store import derive, feedback
    migrate(database_url(get_settings()))

    async def write(conn):  # row by row, as read: an export of any size fits in memory
        upto = await feedback.current_watermark(conn) if args.upto is None else args.upto
        n = 0
        async for r in derive.export_rows(conn, format=args.format, after=args.after, upto=upto):
            out.write(derive.jsonl_line(r))
            n += 1
        return upto, n

    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        upto, n = asyncio.run(_with_conn(write))
    finally:
        if args.out:
            out.close()
    print(f"exported {n} {args.format} rows, events ({args.after}, {upto}]; "
          f"next time: --after {upto}", file=sys.stderr)


def serve() -> None:
    import uvicorn

    # uvicorn re-raises SIGTERM after its graceful shutdown; as SystemExit it unwinds through our
    # `finally` blocks and atexit (the trainer child, the embedded database) instead of killing us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s = get_settings()
    uvicorn.run("service.app:app", host=s.host, port=s.port, workers=s.workers, log_level="info",
                timeout_graceful_shutdown=30)


def cmd_up(args) -> None:
    """The whole loop on one machine: database, a policy (bootstrapped on first run), the API,
    and the trainer service beside it."""
    settings = get_settings()
    url = database_url(settings)  # starts the embedded server when DATABASE_URL is unset
    os.environ["DATABASE_URL"] = url  # children share this server
    migrate(url)
    active = asyncio.run(_with_conn(lambda c: registry.get_active_version(c, kind="policy")))
    if active is None and not settings.policy_path:
        print("feedloop: no policy yet; bootstrapping one from the bundled demonstrations …", flush=True)
        if run_trainer(["bootstrap"]) != 0:
            sys.exit("feedloop: bootstrap failed")
    key_hint = _operator_key_hint(settings)
    base = f"http://{settings.host}:{settings.port}"
    print(f"\nfeedloop is starting at {base}  (OpenAI base_url: {base}/v1, model: {settings.model_name})\n"
          f"console: open {base}/ in a browser and sign in with an API key\n"
          f"{key_hint}\n", flush=True)
    trainer = start_trainer()
    try:
        serve()
    finally:
        trainer.terminate()
        trainer.wait(30)


def start_trainer() -> subprocess.Popen:
    """The trainer service as its own process at a lower CPU priority, so training never starves
    serving; on a CPU-only machine it also gets one torch thread unless told otherwise."""
    env = dict(os.environ)
    env.setdefault("FEEDLOOP_TORCH_THREADS", "1")
    return subprocess.Popen([sys.executable, "-m", "trainer", "trainer"], env=env, preexec_fn=_lower_priority)


def _lower_priority() -> None:
    """In the trainer child before exec: nice 10, and on Linux die with the parent however it dies."""
    os.nice(10)
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _operator_key_hint(settings) -> str:
    async def first_key(conn):
        if settings.init_api_key or await keys.count_live_operator_keys(conn):
            return None
        return await keys.create_api_key(conn, name="created by feedloop up", role="operator")

    created = asyncio.run(_with_conn(first_key))
    how = "more keys: .venv/bin/feedloop keys create --role user --name alice"
    if created:
        return f"operator API key (shown once, only its hash is stored): {created.key}\n{how}"
    return f"use your operator key (FEEDLOOP_INIT_API_KEY or one you created); {how}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINER_COMMANDS:
        sys.exit(run_trainer(argv))
    if argv and argv[0] in SIM_COMMANDS:
        sys.exit(run_simulator(argv))
    parser = argparse.ArgumentParser(prog="feedloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="database + policy + API on this machine").set_defaults(run=cmd_up)
    sub.add_parser("serve", help="the API only").set_defaults(run=lambda a: serve())
    sub.add_parser("migrate", help="apply database migrations").set_defaults(run=cmd_migrate)
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--name", default="cli")
    create.add_argument("--role", choices=["user", "operator"], default="user")
    create.add_argument("--rate-limit", type=positive_int, default=None, help="requests per minute (default: none)")
    keys_sub.add_parser("list")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("id", type=int)
    keys.set_defaults(run=cmd_keys)
    models = sub.add_parser("models", help="the model registry")
    models_sub = models.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list")
    for action in ("promote", "canary", "reject", "target", "verify"):
        p = models_sub.add_parser(action)
        p.add_argument("id", type=int)
        p.add_argument("--reason")
        if action == "canary":
            p.add_argument("--fraction", type=float, required=True)
    models_sub.add_parser("rollback").add_argument("--reason")
    register = models_sub.add_parser("register", help="a published checkpoint as a new candidate")
    register.add_argument("path")
    register.add_argument("--kind", choices=["policy", "reward"], default="policy")
    register.add_argument("--parent", type=int, help="the version it was derived from")
    register.add_argument("--reason")
    for p in (models_sub.choices["target"], register):
        p.add_argument("--endpoint", help='the inference server\'s base URL ("": FEEDLOOP_REMOTE_URL)')
        p.add_argument("--model-id", help='the model id it is asked for ("": FEEDLOOP_REMOTE_MODEL, else '
                       "the checkpoint's path)")
    imported = models_sub.add_parser("import", help="a Hugging Face causal-LM directory as a candidate policy "
                                     "(checked; the directory is never modified)")
    imported.add_argument("path")
    imported.add_argument("--reason")
    models.set_defaults(run=cmd_models)
    export = sub.add_parser("export", help="training data as JSONL in TRL's formats")
    export.add_argument("--format", choices=["preference", "kto", "sft"], default="preference")
    export.add_argument("--out", help="file to write (default: standard output)")
    export.add_argument("--after", type=int, default=0, help="only data newer than this watermark")
    export.add_argument("--upto", type=int, help="up to this watermark (default: now)")
    export.set_defaults(run=cmd_export)
    for name in TRAINER_COMMANDS:
        sub.add_parser(name, help="feedback from another system, e.g. `import openwebui --url … --api-key …` "
                       "(python -m trainer)" if name == "import" else "training (python -m trainer)")
    sub.add_parser("simulate", help="simulated users with hidden preferences drive the API and measure the "
                   "served policy round after round (python -m sim)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    args.run(args)


def quiet_libraries() -> None:
    """Keep library chatter (every scheduler tick, every pg_ctl call) out of the operator's log."""
    for name in ("apscheduler", "pgserver"):
        logging.getLogger(name).setLevel(logging.WARNING)
