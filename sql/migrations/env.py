"""Alembic environment for the results store: migrates the connection peftlab hands over.

peftlab runs Alembic programmatically (peftlab.store.migrate); migrations never import its models.
"""
from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    # There is no alembic.ini URL to fall back on: one entry point keeps one set of engine settings.
    raise RuntimeError("run migrations with: peftlab migrate --store URL")

context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
