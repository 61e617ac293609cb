"""`python -m trainer …` — the offline side's entry; `feedloop` hands trainer commands here."""
import argparse
import asyncio
import logging
from pathlib import Path

import psycopg

from schemas.db import database_url, migrate
from schemas.registry import ensure_initial_policy
from schemas.settings import get_settings, resolve_device
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bootstrap", help="build and register the bootstrap policy")
    p.add_argument("--out", help="checkpoint directory (default: $FEEDLOOP_HOME/checkpoints/bootstrap)")
    p.add_argument("--epochs", type=int, help="SFT epochs (default: the bootstrap config's)")
    p.add_argument("--no-register", action="store_true", help="only build the checkpoint")
    p.set_defaults(run=bootstrap)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if settings.torch_threads:
        import torch
        torch.set_num_threads(settings.torch_threads)
    args.run(args)


if __name__ == "__main__":
    main()
