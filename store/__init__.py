"""Postgres: numbered migrations (`db`), every query by name (`sql`, `queries/*.sql`), advisory
locks and NOTIFY channels (`locks`), and typed keyword-only functions over them, one module per
concern: `keys`, `exchanges`, `registry`, `runs`, `feedback` (writes), `derive` (training data,
export, stats). Functions take the caller's connection and return models from `schemas`."""
