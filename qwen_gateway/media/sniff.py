"""What a byte string really is, from its first bytes (never from a declared type or a file name)."""

from __future__ import annotations

# Image formats the engines' decoders (Pillow) read and DashScope accepts.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
# Video containers, each with the FFmpeg demuxer the decoder is pinned to: PyAV never probes the format
# itself, so bytes that merely *claim* to be a video can't reach a playlist/concat demuxer that would
# open other files or URLs.
VIDEO_DEMUXERS = {
    "video/mp4": "mov,mp4,m4a,3gp,3g2,mj2",
    "video/quicktime": "mov,mp4,m4a,3gp,3g2,mj2",
    "video/webm": "matroska,webm",
    "video/x-matroska": "matroska,webm",
    "video/x-msvideo": "avi",
}
# QuickTime files without an ``ftyp`` box start with one of these top-level atoms.
_QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def sniff_image(data: bytes) -> str | None:
    """The image MIME type ``data`` starts with, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data.startswith(b"BM") and len(data) >= 26:
        return "image/bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    return None


def sniff_video(data: bytes) -> str | None:
    """The video container MIME type ``data`` starts with, or None."""
    box = data[4:8]
    if box == b"ftyp":
        return "video/quicktime" if data[8:12] == b"qt  " else "video/mp4"
    if box in _QUICKTIME_ATOMS:
        return "video/quicktime"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        # EBML header; the doctype says which (both are read by the same demuxer).
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"
    if data.startswith(b"RIFF") and data[8:12] == b"AVI ":
        return "video/x-msvideo"
    return None
