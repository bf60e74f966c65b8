"""Read each corpus domain from its installed package and cut it into documents of natural chunks.

A document is the unit of the train/held-out split (a .py file, a .rst page, a Bible chapter,
a run of 25 consecutive WordNet entries); its chunks are the units written to the jsonl files.
"""

from __future__ import annotations

import ast
import gzip
import re
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from chunking import MAX_CHUNK_CHARS, pack, split_long

RST_SOURCES = Path("/usr/share/doc/python3.11-doc/html/_sources")
WORDNET_DICT = Path("/usr/share/dictd/wn.dict.dz")
WORDNET_INDEX = Path("/usr/share/dictd/wn.index")

# Parts of the stdlib that are test suites, generated tables or data dumps rather than code people write.
_CODE_EXCLUDED_PARTS = ("site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__phello__")
_CODE_EXCLUDED_NAMES = ("entities.py", "_sysconfigdata")


@dataclass(frozen=True)
class Document:
    doc_id: str
    chunks: tuple[str, ...]

    @property
    def chars(self) -> int:
        return sum(len(c) for c in self.chunks)


# ---------------------------------------------------------------- code


def _first_line(node: ast.stmt) -> int:
    """1-based first line of a statement, decorators included."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _python_pieces(nodes: list[ast.stmt], lines: list[str], start: int, stop: int) -> list[str]:
    """One piece per statement of `nodes`, which cover lines[start:stop] (0-based, half-open).

    Comments and blank lines before a statement belong to it. A class longer than a chunk is cut
    into its header (with docstring) and one piece per body statement.
    """
    pieces: list[str] = []
    for i, node in enumerate(nodes):
        end = node.end_lineno if i < len(nodes) - 1 else stop
        if isinstance(node, ast.ClassDef) and len("\n".join(lines[start:end])) > MAX_CHUNK_CHARS:
            body = list(node.body)
            header_end = _first_line(body[0]) - 1
            if _is_docstring(body[0]):
                header_end = body.pop(0).end_lineno
            pieces.extend(split_long("\n".join(lines[start:header_end])))
            if body:
                pieces.extend(_python_pieces(body, lines, header_end, end))
        else:
            pieces.extend(split_long("\n".join(lines[start:end])))
        start = end
    return pieces


def python_chunks(source: str) -> list[str]:
    """Chunks of one Python module: functions and classes, small neighbours merged. Raises SyntaxError."""
    tree = ast.parse(source)
    lines = source.split("\n")
    return pack(_python_pieces(tree.body, lines, 0, len(lines)), sep="\n\n", soft_chars=300)


def _is_code_file(path: Path, stdlib: Path) -> bool:
    parts = path.relative_to(stdlib).parts
    if any(p in _CODE_EXCLUDED_PARTS for p in parts[:-1]) or parts[-1].startswith("test_"):
        return False
    return not any(parts[-1].startswith(n) for n in _CODE_EXCLUDED_NAMES)


def read_code() -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        if not _is_code_file(path, stdlib):
            continue
        try:
            chunks = python_chunks(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # lib2to3 fixtures in Python 2 syntax and the like
        if chunks:
            docs.append(Document(str(path.relative_to(stdlib)), tuple(chunks)))
    return docs


# ---------------------------------------------------------------- docs

_UNDERLINE = re.compile(r"^([=\-~^*\"'`#+:.])\1{2,}\s*$")


def _heading_starts(lines: list[str]) -> list[int]:
    """0-based line indices where a reST section (title, or overline + title) begins."""
    starts = []
    for i in range(len(lines) - 1):
        title, under = lines[i], lines[i + 1]
        if not title.strip() or title[0].isspace() or _UNDERLINE.match(title) or not _UNDERLINE.match(under):
            continue
        if len(under.rstrip()) < len(title.rstrip()) - 2:
            continue
        has_overline = i > 0 and _UNDERLINE.match(lines[i - 1]) and lines[i - 1].strip() == under.strip()
        starts.append(i - 1 if has_overline else i)
    return starts


def rst_chunks(text: str) -> list[str]:
    """Chunks of one reST page: one per section, long sections cut at paragraphs, small ones merged."""
    lines = text.replace("\r\n", "\n").split("\n")
    bounds = sorted({0, *_heading_starts(lines), len(lines)})
    pieces = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        pieces.extend(split_long("\n".join(lines[a:b]).strip("\n")))
    return pack(pieces, sep="\n\n", soft_chars=400)


def read_docs() -> list[Document]:
    docs = []
    for path in sorted(RST_SOURCES.rglob("*.rst.txt")):
        chunks = rst_chunks(path.read_text(encoding="utf-8"))
        if chunks:
            docs.append(Document(str(path.relative_to(RST_SOURCES)), tuple(chunks)))
    return docs


# ---------------------------------------------------------------- prose

_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def kjv_documents(dump: str) -> list[Document]:
    """`bible -f` output ("Ge1:1 In the beginning ...", one verse a line) -> one document per chapter.

    A chunk is a few consecutive verses, one verse a line, without verse numbers.
    """
    chapters: dict[str, list[str]] = {}
    for line in dump.splitlines():
        m = _VERSE.match(line)
        if m:
            chapters.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(4).strip())
    return [Document(cid, tuple(pack(verses, sep="\n", soft_chars=500))) for cid, verses in chapters.items()]


def read_prose() -> list[Document]:
    dump = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    return kjv_documents(dump)


# ---------------------------------------------------------------- dictionary

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SENSE_START = re.compile(r"^(?:(?:n|v|adj|adv)\s+)?\d+:\s")


def _dictd_number(b64: str) -> int:
    value = 0
    for ch in b64:
        value = value * 64 + _B64.index(ch)
    return value


def wordnet_entry(raw: str) -> str:
    """A dictd WordNet entry with wrapped lines joined: headword, then one line per sense."""
    lines = raw.strip("\n").split("\n")
    senses: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if not stripped:
            continue
        if _SENSE_START.match(stripped) or not senses:
            senses.append(stripped)
        else:
            senses[-1] += " " + stripped
    return "\n".join([lines[0].strip(), *senses])


def wordnet_documents(dict_text: bytes, index_text: str, entries_per_doc: int = 25) -> list[Document]:
    """Entries in file order (alphabetical), grouped into documents of `entries_per_doc` entries."""
    spans = set()
    for line in index_text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and not fields[0].startswith("00-database") and not fields[0].startswith("00database"):
            spans.add((_dictd_number(fields[1]), _dictd_number(fields[2])))
    entries = [wordnet_entry(dict_text[o:o + n].decode("utf-8")) for o, n in sorted(spans)]
    docs = []
    for i in range(0, len(entries), entries_per_doc):
        group = entries[i:i + entries_per_doc]
        pieces = [p for entry in group for p in split_long(entry)]
        docs.append(Document(f"wn{i // entries_per_doc:05d}", tuple(pack(pieces, sep="\n\n", soft_chars=500))))
    return docs


def read_dictionary() -> list[Document]:
    with gzip.open(WORDNET_DICT, "rb") as f:
        dict_text = f.read()
    return wordnet_documents(dict_text, WORDNET_INDEX.read_text(encoding="utf-8"))


READERS = {"code": read_code, "docs": read_docs, "prose": read_prose, "dictionary": read_dictionary}
