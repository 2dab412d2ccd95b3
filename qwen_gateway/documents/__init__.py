"""Text out of uploaded documents (Qwen-Long's ``file-extract`` files), safely.

Every byte of an upload is hostile until proven otherwise, so the parsing never runs in the server's
process: :func:`~qwen_gateway.documents.runner.extract_text` starts a child process
(``python -m qwen_gateway.documents.worker``) that caps its own address space, CPU time, open files and
file writes with ``setrlimit`` before it reads a byte, and the parent kills it at a wall-clock deadline.
A zip bomb, a PDF whose page tree loops or a parser bug can cost one child process, never the server.

Inside the child (``extract.py``) the format is chosen by magic bytes (``sniff.py``), never by the file
name; archive formats are checked entry by entry (count, declared sizes, ratio, nesting, encryption)
before any library opens them.
"""

from __future__ import annotations

from qwen_gateway.documents.runner import Extracted, ExtractLimits, Refused, extract_text

__all__ = ["ExtractLimits", "Extracted", "Refused", "extract_text"]
