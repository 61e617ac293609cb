"""Migrations: numbered, applied once, idempotent, and by `feedloop migrate`."""
import os
import re
import subprocess
import sys

import psycopg

from store.db import migrate, migrations
from store.sql import load_queries
from tests.conftest import ROOT


def test_migrations_are_numbered_in_order():
    """Each number once, from 1 up. Gaps are allowed: parallel branches reserve numbers (008 may
    land after 009), and the runner applies whatever a database lacks, in order."""
    numbers = [n for n, _, _ in migrations()]
    assert numbers[0] == 1 and numbers == sorted(set(numbers))


def test_migrate_is_idempotent(db_url):
    assert migrate(db_url) == []  # the template has them all
    with psycopg.connect(db_url) as conn:
        applied = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == [n for n, _, _ in migrations()]


def test_cli_migrates_an_empty_database(new_database, admin_url):
    url = new_database()
    with psycopg.connect(url, autocommit=True) as conn:  # empty it: a database nobody migrated yet
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    env = dict(os.environ, DATABASE_URL=url)
    first = subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    second = subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "applied migrations: [1" in first and "up to date" in second


def test_every_named_query_parses_against_the_schema(db_url):
    """Postgres prepares each query (types and names checked) without running it."""
    with psycopg.connect(db_url) as conn:
        for name, sql in load_queries().items():
            unbound = re.sub(r"%\((\w+)\)s", "NULL", sql)
            conn.execute(f"PREPARE q_{name} AS {unbound}")
            conn.execute(f"DEALLOCATE q_{name}")


def test_completions_are_immutable(server, openai_client):
    r = openai_client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": "Hi"}])
    with psycopg.connect(server.db_url) as conn:
        try:
            conn.execute("UPDATE completions SET text = 'rewritten' WHERE request_id ="
                         " (SELECT id FROM chat_requests WHERE response_id = %s)", (r.id,))
        except psycopg.errors.RaiseException as e:
            assert "immutable" in str(e)
        else:
            raise AssertionError("a completion was rewritten")
