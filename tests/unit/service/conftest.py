from __future__ import annotations

# Store-backed service tests run on SQLite and on PostgreSQL (see tests/databases.py).
from tests.databases import backend, db_url, postgres_url  # noqa: F401
