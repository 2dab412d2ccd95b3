"""SQL storage: the schema (``tables``), its migrations, the ``Store`` handle and repository functions.

Repository functions are keyword-only and take a :class:`~qwen_gateway.store.db.Store` or a connection
already in a transaction; they return frozen row dataclasses, never wire models.
"""
