"""A throwaway PostgreSQL cluster that a test may stop, start and restart: the binaries pgserver
ships, a data directory of its own, TCP on a free port. Never the machine's server."""
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


def _bin(name: str) -> str:
    import pgserver._commands
    return str(pgserver._commands.POSTGRES_BIN_PATH / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`initdb` once; `start`, `stop`, `restart` as often as a test likes; `remove` at the end.
    As root, postgres runs as pgserver's own system user (postgres refuses to run as root)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="feedloop-fault-pg-"))
        self.dir.chmod(0o755)
        self.pgdata, self.port = self.dir / "data", _free_port()
        self.user = None
        if os.geteuid() == 0:
            from pgserver.utils import ensure_user_exists
            ensure_user_exists("pgserver")
            self.user = "pgserver"
            shutil.chown(self.dir, user=self.user)
        self._run(_bin("initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), user=self.user, check=check, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=60)

    def start(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-l", str(self.dir / "log"),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=on", "start")

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, work in flight is rolled back."""
        self._run(_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast", "stop")

    def restart(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast", "-l", str(self.dir / "log"),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir}", "restart")

    def accepting(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def database(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
