"""Simulated users: a client of feedloop's HTTP API only (`feedloop simulate`, `make demo`). It
imports nothing of the service, the store, the trainer or the models; the held-out prompts it
measures on come from the bundled data files (`schemas/bundled.py`, stdlib only)."""
