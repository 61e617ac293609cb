"""Contracts shared by the online and offline sides: settings, wire models, the Postgres schema
and the typed queries over it, and the checkpoint manifest."""
