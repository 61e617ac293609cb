"""The layout is the architecture: which package may import which (DESIGN.md, "Layout").

    schemas   contracts only: imports nothing of ours, and no database driver or model library
    store     -> schemas                (Postgres)
    lm        -> schemas                (running a language model)
    service   -> lm, store, schemas     (the online side)
    trainer   -> lm, store, schemas     (the offline side)
    sim       -> schemas.bundled only   (an HTTP client; the bundled data files)

The service and the trainer meet only in Postgres and the checkpoint directory; nothing imports
`sim`."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("schemas", "store", "lm", "service", "trainer", "sim")
ALLOWED = {
    "schemas": {"schemas"},
    "store": {"store", "schemas"},
    "lm": {"lm", "schemas"},
    "service": {"service", "lm", "store", "schemas"},
    "trainer": {"trainer", "lm", "store", "schemas"},
    "sim": {"sim", "schemas.bundled"},
}
# Contracts stay light: the server's wire models must not drag in a driver or torch.
SCHEMAS_FORBIDDEN = ("psycopg", "psycopg_pool", "torch", "transformers", "fastapi")


def imported_names(source: str) -> list[str]:
    """The full dotted name of everything a file imports, anywhere in it (lazy imports too):
    `import a.b` gives a.b, `from a.b import c` gives a.b.c."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names]
    return found


def violations(package: str, source: str) -> list[str]:
    """The imports in one file of `package` that point against the allowed directions."""
    bad = []
    for name in imported_names(source):
        top = name.split(".")[0]
        if package == "schemas" and top in SCHEMAS_FORBIDDEN:
            bad.append(name)
        elif top in OURS and not any(name == a or name.startswith(a + ".") for a in ALLOWED[package]):
            bad.append(name)
    return bad


def project_files():
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def test_every_package_imports_only_in_the_allowed_directions():
    wrong = {f"{path.relative_to(ROOT)}: {name}"
             for package, path in project_files() for name in violations(package, path.read_text())}
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(wrong))


def test_every_package_exists():
    assert [p for p in OURS if not (ROOT / p / "__init__.py").exists()] == []


@pytest.mark.parametrize("package, line", [
    ("service", "from trainer.round import run_round"),
    ("trainer", "import service.serving"),
    ("trainer", "from sim import simulate"),
    ("store", "from lm.decoding import decode"),
    ("lm", "from store import registry"),
    ("schemas", "import psycopg"),
    ("schemas", "from store.sql import Q"),
    ("sim", "from schemas.openai import ChatCompletion"),
    ("sim", "from trainer import ppo"),
    ("service", "def f():\n    from trainer import gates"),  # a lazy import counts too
])
def test_the_check_catches_an_import_against_the_layout(package, line):
    assert violations(package, line)


@pytest.mark.parametrize("package, line", [
    ("service", "from store import registry"),
    ("trainer", "from lm.chat import encode_prompt"),
    ("sim", "from schemas.bundled import heldout_prompts"),
    ("sim", "import httpx"),
    ("schemas", "from pydantic import BaseModel"),
])
def test_the_check_lets_allowed_imports_through(package, line):
    assert not violations(package, line)
