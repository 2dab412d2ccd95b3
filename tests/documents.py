"""Documents built by the tests: real files of each format, and hostile ones (bombs, loops, encryption).

Every file is made here from scratch (python-docx, openpyxl, python-pptx, pypdf, zipfile, or PDF syntax
written out), so a test says exactly what it uploads.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path


def docx_bytes(*paragraphs: str, table: list[list[str]] | None = None) -> bytes:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def xlsx_bytes(rows: list[list[object]], title: str = "Prices") -> bytes:
    import openpyxl

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = title
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def pptx_bytes(*slides: str) -> bytes:
    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    for text in slides:
        slide = deck.slides.add_slide(deck.slide_layouts[6])
        box = slide.shapes.add_textbox(Inches(1), Inches(1), Inches(6), Inches(1))
        box.text_frame.text = text
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def epub_bytes(*chapters: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(zipfile.ZipInfo("mimetype"), "application/epub+zip")
        zf.writestr(
            "META-INF/container.xml",
            '<?xml version="1.0"?><container version="1.0" '
            'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
            '<rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
            "</rootfiles></container>",
        )
        items = "".join(
            f'<item id="c{i}" href="c{i}.xhtml" media-type="application/xhtml+xml"/>'
            for i in range(len(chapters))
        )
        spine = "".join(f'<itemref idref="c{i}"/>' for i in range(len(chapters)))
        zf.writestr(
            "OEBPS/content.opf",
            '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0">'
            f"<manifest>{items}</manifest><spine>{spine}</spine></package>",
        )
        for i, text in enumerate(chapters):
            zf.writestr(
                f"OEBPS/c{i}.xhtml",
                f'<html xmlns="http://www.w3.org/1999/xhtml"><head><title>t</title>'
                f"<style>p{{}}</style></head><body><p>{text}</p></body></html>",
            )
    return out.getvalue()


def _pdf_string(text: str) -> bytes:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")


def pdf_bytes(
    *pages: str,
    kids_loop: bool = False,
    content_stream: bytes | None = None,
    flate: bool = False,
) -> bytes:
    """A PDF written out object by object: one page per string (Helvetica text).

    ``kids_loop`` makes the page tree list itself among its kids (a loop); ``content_stream`` replaces
    every page's content (``flate``: stored FlateDecode-compressed)."""
    objects: list[bytes] = []
    n = len(pages)
    kids = [f"{3 + 2 * i} 0 R" for i in range(n)]
    if kids_loop:
        kids.append("2 0 R")
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {n} >>".encode())
    font = 3 + 2 * n
    for i, text in enumerate(pages):
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        stream = (
            content_stream
            if content_stream is not None
            else (b"BT /F1 12 Tf 72 720 Td (" + _pdf_string(text) + b") Tj ET")
        )
        extra = b""
        if flate:
            stream = zlib.compress(stream, 9)
            extra = b" /Filter /FlateDecode"
        objects.append(
            b"<< /Length " + str(len(stream)).encode() + extra + b" >>\nstream\n" + stream + b"\nendstream"
        )
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypted_pdf_bytes(text: str, password: str = "secret") -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes(text))))
    writer.encrypt(user_password=password, owner_password=password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_with(extra: dict[str, bytes], *, base: bytes | None = None, stored: bool = False) -> bytes:
    """A real docx with more entries added (``stored``: not compressed)."""
    source = zipfile.ZipFile(io.BytesIO(base or docx_bytes("A real document.")))
    out = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for info in source.infolist():
            zf.writestr(info, source.read(info))
        for name, data in extra.items():
            zf.writestr(name, data, compress_type=method)
    return out.getvalue()


def lying_size_docx(real_size: int = 20 * 1024 * 1024) -> bytes:
    """A docx whose document.xml declares 1 KiB unpacked in both headers but unpacks to ``real_size``."""
    body = b"<w:t>" + b"A" * real_size + b"</w:t>"
    data = bytearray(docx_with({"word/media/big.xml": body}))
    packed_name = b"word/media/big.xml"
    # Patch the uncompressed size in the local header (offset 22) and the central record (offset 24).
    pos = 0
    while (pos := data.find(b"PK\x03\x04", pos)) != -1:
        name_len = struct.unpack_from("<H", data, pos + 26)[0]
        if data[pos + 30 : pos + 30 + name_len] == packed_name:
            struct.pack_into("<I", data, pos + 22, 1024)
        pos += 4
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + name_len] == packed_name:
            struct.pack_into("<I", data, pos + 24, 1024)
        pos += 4
    return bytes(data)


def encrypted_flag_docx() -> bytes:
    """A docx whose entries carry the zip "encrypted" flag (general-purpose bit 0), as ZipCrypto sets it."""
    data = bytearray(docx_bytes("secret text"))
    pos = 0
    while (pos := data.find(b"PK\x03\x04", pos)) != -1:
        data[pos + 6] |= 0x01
        pos += 4
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:
        data[pos + 8] |= 0x01
        pos += 4
    return bytes(data)


def zip_of(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
