"""`python -m trainer …` — the offline side's entry; `feedloop` hands trainer commands here."""
import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

import psycopg

from lm.device import resolve_device
from schemas.settings import get_settings
from store.db import database_url, migrate
from store.registry import ensure_initial_policy
from trainer.bootstrap import BootstrapConfig, build

log = logging.getLogger("trainer")


def bootstrap(args) -> None:
    """Build the bootstrap policy (or reuse a finished one) and register it as the first version."""
    settings = get_settings()
    out = Path(args.out) if args.out else settings.checkpoint_dir / "bootstrap"
    cfg = BootstrapConfig(seed=settings.bootstrap_seed)
    cfg.sft.seed = settings.bootstrap_seed
    cfg.sft.device = resolve_device(settings.device)
    if args.epochs:
        cfg.sft.epochs = args.epochs
    manifest = build(cfg, out)
    log.info("bootstrap policy %s (%s)", out, manifest["content_hash"][:19])
    if args.no_register:
        return
    url = database_url(settings)
    migrate(url)

    async def register():
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await ensure_initial_policy(conn, path=out, actor="bootstrap")

    version = asyncio.run(register())
    log.info("active policy is %s at %s", version.name, version.path)


def trainer_service(args) -> None:
    from trainer.scheduler import serve
    serve(get_settings())


def train(args) -> None:
    """`train` / `train round`: one round now, under the round lock, then exit; `train reward|sft|ppo`:
    that one stage on all the data so far (`ppo` against the active reward model)."""
    from trainer.round import run_round
    settings = get_settings()
    url = database_url(settings)
    migrate(url)
    overrides = json.loads(args.config) if args.config else {}
    if args.what != "round":
        overrides["stages"] = [args.what]
    run = asyncio.run(run_round(url, settings, trigger="cli", overrides=overrides))
    if run is None:
        sys.exit("another round is running")
    print(json.dumps({"run": run.id, "status": run.status, "version": run.produced_version_id,
                      "error": (run.error or "").splitlines()[-1:] or None,
                      "gates": run.metrics.get("gates/reasons")}, indent=2))
    sys.exit(0 if run.status in ("succeeded", "skipped") else 1)


def import_openwebui(args) -> None:
    """Open WebUI's feedback, joined to the exchanges it is about, recorded as feedloop feedback;
    prints what was recorded and what could not be joined (JSON)."""
    import httpx

    from trainer.openwebui import run_import
    url = database_url(get_settings())
    migrate(url)
    try:
        report = asyncio.run(run_import(url, args.url, args.api_key))
    except httpx.HTTPError as e:  # unreachable, a wrong key (401), not an admin's (403)...
        sys.exit(f"feedloop: could not read Open WebUI's feedback at {args.url}: {e}")
    print(json.dumps(report.as_dict(), indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bootstrap", help="build and register the bootstrap policy")
    p.add_argument("--out", help="checkpoint directory (default: $FEEDLOOP_HOME/checkpoints/bootstrap)")
    p.add_argument("--epochs", type=int, help="SFT epochs (default: the bootstrap config's)")
    p.add_argument("--no-register", action="store_true", help="only build the checkpoint")
    p.set_defaults(run=bootstrap)
    p = sub.add_parser("trainer", help="the trainer service: scheduled and requested rounds")
    p.set_defaults(run=trainer_service)
    p = sub.add_parser("train", help="one training round now")
    p.add_argument("what", nargs="?", default="round", choices=["round", "sft", "reward", "ppo"],
                   help="a whole round (default) or one stage")
    p.add_argument("--config", help='JSON overrides of the round config, e.g. \'{"ppo": {"steps": 8}}\'')
    p.set_defaults(run=train)
    p = sub.add_parser("import", help="feedback from another system")
    p.add_argument("system", choices=["openwebui"])
    settings = get_settings()
    p.add_argument("--url", default=settings.openwebui_url, required=not settings.openwebui_url,
                   help="Open WebUI's base URL (default: FEEDLOOP_OPENWEBUI_URL)")
    p.add_argument("--api-key", default=settings.openwebui_api_key, required=not settings.openwebui_api_key,
                   help="an Open WebUI admin's API key (default: FEEDLOOP_OPENWEBUI_API_KEY)")
    p.set_defaults(run=import_openwebui)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("apscheduler", "pgserver", "httpx"):  # no log line for every scheduler tick or page
        logging.getLogger(name).setLevel(logging.WARNING)
    if settings.torch_threads:
        import torch
        torch.set_num_threads(settings.torch_threads)
    args.run(args)


if __name__ == "__main__":
    main()
