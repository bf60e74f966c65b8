"""Cut text into natural chunks of roughly 100-1500 characters (a function, a section, a few verses)."""

from __future__ import annotations

MAX_CHUNK_CHARS = 1500


def split_long(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Split `text` at blank lines, then at line ends, then hard, so every piece is <= max_chars."""
    if len(text) <= max_chars:
        return [text]
    units: list[str] = []
    for paragraph in text.split("\n\n"):
        if len(paragraph) <= max_chars:
            units.append(paragraph)
            continue
        lines = [line[i:i + max_chars] for line in paragraph.split("\n")
                 for i in range(0, max(len(line), 1), max_chars)]
        units.extend(pack(lines, sep="\n", soft_chars=max_chars, max_chars=max_chars))
    return pack(units, sep="\n\n", soft_chars=max_chars, max_chars=max_chars)


def pack(pieces: list[str], sep: str, soft_chars: int, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Greedily join consecutive pieces while the running chunk is shorter than `soft_chars`.

    A piece that already reaches `soft_chars` stands alone (a whole function stays one chunk);
    small neighbours (imports, one-line verses) are merged until the chunk is big enough.
    No chunk made of several pieces exceeds `max_chars`.
    """
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        piece = piece.strip("\n")
        if not piece.strip():
            continue
        if current and len(current) < soft_chars and len(current) + len(sep) + len(piece) <= max_chars:
            current += sep + piece
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks
