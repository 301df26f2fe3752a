"""Hostile images for tests: a PNG whose header claims a huge size (a decompression bomb)."""

from __future__ import annotations

import struct
import zlib

__all__ = ["png_bomb"]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A ~70-byte PNG whose IHDR claims ``width`` x ``height`` RGB pixels (one empty IDAT)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )
