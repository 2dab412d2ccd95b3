"""Which parser a document gets, from its first bytes (and, for a zip, its entry names).

The file name and the declared content type are never consulted: a PDF called ``notes.txt`` is read as
a PDF, and a zip called ``report.docx`` that holds no Word document is refused.
"""

from __future__ import annotations

import codecs
from typing import Literal

Kind = Literal["pdf", "zip", "cfb", "html", "text", "unknown"]

PDF_MAGIC = b"%PDF-"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive's end record
# OLE2 compound file: legacy .doc/.xls/.ppt, and the wrapper of every password-protected OOXML file.
CFB_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Archive formats an archive entry must not be (a nested archive is how 42.zip-style bombs multiply).
ARCHIVE_MAGICS = (
    b"PK\x03\x04",
    b"\x1f\x8b",  # gzip
    b"BZh",  # bzip2
    b"\xfd7zXZ\x00",  # xz
    b"7z\xbc\xaf\x27\x1c",  # 7-Zip
    b"Rar!\x1a\x07",  # RAR
    b"\x28\xb5\x2f\xfd",  # zstd
)
# Where Office keeps embedded objects (a chart's workbook inside a docx is itself a zip): never opened
# by the extractor, so a nested archive there can't expand, and a real document with a chart is kept.
EMBEDDING_DIRS = ("word/embeddings/", "xl/embeddings/", "ppt/embeddings/")

# The PDF header may follow some junk; readers look in the first 1024 bytes (PDF 32000-1, annex H).
PDF_WINDOW = 1024
HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body")


def kind_of(head: bytes) -> Kind:
    """The family of a document from its first bytes (at least 4 KiB of it when the file is longer)."""
    if PDF_MAGIC in head[:PDF_WINDOW]:
        return "pdf"
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if head.startswith(CFB_MAGIC):
        return "cfb"
    text = _decoded_head(head)
    if text is None:
        return "unknown"
    lowered = text.lstrip("\ufeff \t\r\n").lower().encode("utf-8", "replace")
    if lowered.startswith(HTML_MARKERS) or (lowered.startswith(b"<?xml") and b"<html" in lowered[:1024]):
        return "html"
    return "text"


def _decoded_head(head: bytes) -> str | None:
    """The head as text when it is UTF-8 (or UTF-16 with a BOM) with no control bytes; else None."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = head.decode("utf-16")
        except UnicodeDecodeError:
            # A head cut in the middle of a code unit: drop the last byte and try once more.
            try:
                text = head[:-1].decode("utf-16")
            except UnicodeDecodeError:
                return None
    else:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            # final=False: the head may end inside a multi-byte character.
            text = decoder.decode(head, final=False)
        except UnicodeDecodeError:
            return None
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    return text


def is_archive(head: bytes) -> bool:
    return head.startswith(ARCHIVE_MAGICS)


def text_encoding(head: bytes) -> str:
    """The codec to read a ``text``/``html`` document with."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8-sig"
