"""The parsers, run inside the extraction child process (``worker.py``) only.

Each one appends to a :class:`TextSink` that stops the parse as soon as the text passes its cap, and
raises :class:`Refusal` with a fixed reason code for anything it will not read. Libraries: pypdf (pure
Python, maintained, with its own decompression caps), python-docx, openpyxl (read-only mode streams
rows), python-pptx, and the standard library's zipfile / ElementTree / HTMLParser for EPUB and HTML.
"""

from __future__ import annotations

import codecs
import posixpath
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from qwen_gateway.documents.sniff import CFB_MAGIC, EMBEDDING_DIRS, is_archive, kind_of, text_encoding

HEAD_BYTES = 8192
# Entries larger than this unpacked are held to the compression-ratio cap (small XML parts legitimately
# compress 50-100x; a bomb needs size to do harm).
RATIO_FLOOR = 1024 * 1024


class Refusal(Exception):
    """The document is not read; ``reason`` is one of the codes ``runner.REASONS`` knows."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Caps:
    max_text_chars: int
    max_pages: int
    max_archive_entries: int
    max_unpacked_bytes: int
    max_compression_ratio: int


class TextSink:
    """The extracted text, refused once it passes ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> None:
        if not text:
            return
        self.size += len(text) + 1
        if self.size > self.limit:
            raise Refusal("too_much_text")
        self.parts.append(text)

    def text(self) -> str:
        return "\n".join(self.parts).strip()


def extract(path: Path, caps: Caps) -> tuple[str, int | None]:
    """The text of the document at ``path`` and its page count (None where the format has no pages)."""
    with path.open("rb") as fh:
        head = fh.read(HEAD_BYTES)
    kind = kind_of(head)
    sink = TextSink(caps.max_text_chars)
    pages: int | None = None
    if kind == "pdf":
        pages = _pdf(path, sink, caps)
    elif kind == "zip":
        pages = _archive(path, sink, caps)
    elif kind == "cfb":
        # Password-protected docx/xlsx/pptx are an OLE2 file holding an "EncryptedPackage" stream;
        # any other OLE2 file is a legacy binary format (.doc, .xls) we have no parser for.
        data = path.read_bytes() if path.stat().st_size <= 64 * 1024 * 1024 else head
        raise Refusal("encrypted" if "EncryptedPackage".encode("utf-16-le") in data else "unsupported")
    elif kind == "html":
        _html(_read_text(path, text_encoding(head), caps), sink)
    elif kind == "text":
        sink.add(_read_text(path, text_encoding(head), caps))
    else:
        raise Refusal("unsupported")
    text = sink.text()
    if not text:
        raise Refusal("blank")
    return text, pages


def _read_text(path: Path, encoding: str, caps: Caps) -> str:
    """The whole file decoded, refused past the text cap or at the first byte that is not text."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    out: list[str] = []
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            try:
                piece = decoder.decode(chunk)
            except UnicodeDecodeError:
                raise Refusal("unsupported") from None
            if "\x00" in piece:
                raise Refusal("unsupported")
            size += len(piece)
            if size > caps.max_text_chars:
                raise Refusal("too_much_text")
            out.append(piece)
        try:
            out.append(decoder.decode(b"", final=True))
        except UnicodeDecodeError:
            raise Refusal("unsupported") from None
    return "".join(out)


# -- PDF -------------------------------------------------------------------------------------------


def _pdf(path: Path, sink: TextSink, caps: Caps) -> int:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError, PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            # Many PDFs are encrypted with an empty user password (permissions only): those open.
            try:
                opened = reader.decrypt("")
            # DependencyError: AES needs the optional cryptography package (not a dependency).
            except (DependencyError, FileNotDecryptedError, NotImplementedError, PdfReadError, ValueError):
                raise Refusal("encrypted") from None
            if not opened:
                raise Refusal("encrypted")
        count = len(reader.pages)
        if count > caps.max_pages:
            raise Refusal("too_many_pages")
        for page in reader.pages:
            sink.add(page.extract_text() or "")
    except FileNotDecryptedError:
        raise Refusal("encrypted") from None
    except LimitReachedError:
        # pypdf's own cap on what one stream may inflate to: a PDF bomb.
        raise Refusal("bomb") from None
    except RecursionError:
        # A page tree or an object chain that refers back to itself.
        raise Refusal("corrupt") from None
    except PdfReadError:
        raise Refusal("corrupt") from None
    return count


# -- archives (docx, xlsx, pptx, epub) -------------------------------------------------------------


def _archive(path: Path, sink: TextSink, caps: Caps) -> int | None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "word/document.xml" in names:
                kind = "docx"
            elif "xl/workbook.xml" in names:
                kind = "xlsx"
            elif "ppt/presentation.xml" in names:
                kind = "pptx"
            elif "mimetype" in names and _small_entry(zf, "mimetype").strip() == b"application/epub+zip":
                kind = "epub"
            else:
                # A plain zip (or a zip of anything else) is not a document.
                raise Refusal("unsupported")
            _check_archive(zf, caps, embeddings_ok=kind != "epub")
            if kind == "epub":
                _epub(zf, sink)
                return None
    except zipfile.BadZipFile:
        # Also what zipfile raises when an entry unpacks to other than its declared size (its CRC
        # then fails): a lying size never gets past its declaration.
        raise Refusal("corrupt") from None
    # Anything else these libraries raise on a malformed part is classified "corrupt" by the worker.
    if kind == "docx":
        _docx(path, sink)
        return None
    if kind == "xlsx":
        _xlsx(path, sink)
        return None
    return _pptx(path, sink, caps)


def _small_entry(zf: zipfile.ZipFile, name: str, limit: int = 256) -> bytes:
    with zf.open(name) as fh:
        return fh.read(limit)


def _check_archive(zf: zipfile.ZipFile, caps: Caps, *, embeddings_ok: bool) -> None:
    """Refuse bombs before any library opens the archive: too many entries, too many bytes declared
    unpacked, an entry that packs too well, encrypted entries, and archives inside the archive."""
    infos = zf.infolist()
    if len(infos) > caps.max_archive_entries:
        raise Refusal("bomb")
    declared = 0
    for info in infos:
        if info.flag_bits & 0x1:
            raise Refusal("encrypted")
        declared += info.file_size
        if declared > caps.max_unpacked_bytes:
            raise Refusal("bomb")
        if info.file_size > RATIO_FLOOR and info.file_size > caps.max_compression_ratio * max(
            info.compress_size, 1
        ):
            raise Refusal("bomb")
    for info in infos:
        if info.is_dir() or (embeddings_ok and info.filename.startswith(EMBEDDING_DIRS)):
            continue
        with zf.open(info) as fh:
            if is_archive(fh.read(8)):
                raise Refusal("nested_archive")


def _docx(path: Path, sink: TextSink) -> None:
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    document = docx.Document(str(path))
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            sink.add(block.text)
        elif isinstance(block, Table):
            _rows(sink, ([cell.text for cell in row.cells] for row in block.rows))


def _rows(sink: TextSink, rows: Iterable[Iterable[Any]]) -> None:
    for row in rows:
        cells = ["" if v is None else str(v) for v in row]
        while cells and not cells[-1]:
            cells.pop()
        if cells:
            sink.add("\t".join(cells))


def _xlsx(path: Path, sink: TextSink) -> None:
    import openpyxl

    # A file object, not the path: openpyxl refuses a path by its extension, and ours has none (the
    # format was chosen by content). read_only streams rows instead of building every cell first.
    with path.open("rb") as fh:
        workbook = openpyxl.load_workbook(fh, read_only=True, data_only=True)
        try:
            for sheet in workbook.worksheets:
                sink.add(f"# {sheet.title}")
                _rows(sink, sheet.iter_rows(values_only=True))
        finally:
            workbook.close()


def _pptx(path: Path, sink: TextSink, caps: Caps) -> int:
    from pptx import Presentation

    presentation = Presentation(str(path))
    slides = list(presentation.slides)
    if len(slides) > caps.max_pages:
        raise Refusal("too_many_pages")
    for slide in slides:
        _shapes(slide.shapes, sink, depth=0)
    return len(slides)


def _shapes(shapes: Any, sink: TextSink, *, depth: int) -> None:
    if depth > 32:  # groups nested past any real deck's
        raise Refusal("corrupt")
    for shape in shapes:
        if getattr(shape, "shape_type", None) == 6:  # MSO_SHAPE_TYPE.GROUP
            _shapes(shape.shapes, sink, depth=depth + 1)
        elif getattr(shape, "has_text_frame", False):
            sink.add(shape.text_frame.text)
        elif getattr(shape, "has_table", False):
            _rows(sink, ([cell.text for cell in row.cells] for row in shape.table.rows))


_CONTAINER_NS = "{urn:oasis:names:tc:opendocument:xmlns:container}"
_OPF_NS = "{http://www.idpf.org/2007/opf}"


def _epub(zf: zipfile.ZipFile, sink: TextSink) -> None:
    """The spine's documents in reading order (the OPF package file names them)."""
    try:
        container = ElementTree.fromstring(zf.read("META-INF/container.xml"))
        rootfile = container.find(f"{_CONTAINER_NS}rootfiles/{_CONTAINER_NS}rootfile")
        opf_path = rootfile.get("full-path", "") if rootfile is not None else ""
        package = ElementTree.fromstring(zf.read(opf_path))
    except (KeyError, ElementTree.ParseError):
        raise Refusal("corrupt") from None
    base = posixpath.dirname(opf_path)
    manifest = {
        item.get("id"): posixpath.normpath(posixpath.join(base, item.get("href", "")))
        for item in package.iter(f"{_OPF_NS}item")
    }
    order = [manifest.get(ref.get("idref")) for ref in package.iter(f"{_OPF_NS}itemref")]
    names = set(zf.namelist())
    for name in order:
        if name is None or name not in names:
            continue
        raw = zf.read(name)
        _html(raw.decode("utf-8", "replace"), sink)


class _TextOfHtml(HTMLParser):
    """Visible text: script, style and head contents dropped; block elements end a line."""

    SKIP = frozenset({"script", "style", "head", "template", "noscript"})
    BLOCKS = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "title"}
    )

    def __init__(self, sink: TextSink) -> None:
        super().__init__(convert_charrefs=True)
        self.sink = sink
        self.skipping = 0
        self.line: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.line.append(data)

    def flush(self) -> None:
        text = " ".join("".join(self.line).split())
        self.line = []
        self.sink.add(text)


def _html(markup: str, sink: TextSink) -> None:
    parser = _TextOfHtml(sink)
    parser.feed(markup)
    parser.close()
    parser.flush()


__all__ = ["CFB_MAGIC", "Caps", "Refusal", "TextSink", "extract"]
