"""The extraction child's caps, shown on real documents: the parent's deadline kills it, its memory cap
stops it, and the format comes from the bytes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from qwen_gateway.documents import ExtractLimits, Refused, extract_text
from qwen_gateway.documents.sniff import kind_of
from tests import documents as docs

LIMITS = ExtractLimits(
    timeout=120.0,
    memory_bytes=1024**3,
    max_text_chars=100_000,
    max_pages=10,
    max_archive_entries=200,
    max_unpacked_bytes=50_000_000,
    max_compression_ratio=200,
)


def _run(path: Path, limits: ExtractLimits = LIMITS) -> str:
    return asyncio.run(extract_text(path, limits)).text


def test_a_document_is_read_in_the_child(tmp_path: Path) -> None:
    path = docs.write(tmp_path / "doc", docs.docx_bytes("one", "two"))
    assert _run(path) == "one\ntwo"


def test_the_deadline_kills_the_child(tmp_path: Path) -> None:
    path = docs.write(tmp_path / "doc", docs.pdf_bytes("a page"))
    # Far less than the interpreter's start: the child is killed before it answers.
    with pytest.raises(Refused) as err:
        _run(path, dataclasses.replace(LIMITS, timeout=0.01))
    assert err.value.reason == "limits"


def test_the_memory_cap_stops_the_child(tmp_path: Path) -> None:
    path = docs.write(tmp_path / "doc", docs.pdf_bytes("a page"))
    # 32 MiB of address space: not enough to import the PDF parser.
    with pytest.raises(Refused) as err:
        _run(path, dataclasses.replace(LIMITS, memory_bytes=32 * 1024 * 1024))
    assert err.value.reason == "limits"


def test_text_past_the_cap_is_refused(tmp_path: Path) -> None:
    path = docs.write(tmp_path / "doc", b"word " * 30_000)
    with pytest.raises(Refused) as err:
        _run(path)
    assert err.value.reason == "too_much_text"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"%PDF-1.7\n", "pdf"),
        (b"junk before\n%PDF-1.4\n", "pdf"),
        (b"PK\x03\x04rest", "zip"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1rest", "cfb"),
        (b"\xef\xbb\xbf<!DOCTYPE html><html>", "html"),
        ("中文文本".encode()[:-1], "text"),  # cut inside a character: still text
        ("text".encode("utf-16"), "text"),
        (b"\x00\x01\x02binary", "unknown"),
        (b"\xc3\x28 not utf-8", "unknown"),
    ],
)
def test_the_bytes_choose_the_parser(data: bytes, kind: str) -> None:
    assert kind_of(data) == kind
