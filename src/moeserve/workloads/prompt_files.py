"""A prompt, and reading prompts from .jsonl and .txt files (formats: docs/workloads.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moeserve.errors import MoeServeError


@dataclass(frozen=True)
class Prompt:
    """One prompt. For chat sources `text` is the first user turn and `messages` the whole chat."""

    text: str
    domain: str | None
    id: str
    messages: tuple[dict, ...] | None = None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MoeServeError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MoeServeError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise MoeServeError(f"{path}: file is empty")
    return [line.removesuffix("\r") for line in text.split("\n")]  # not splitlines(): JSON may hold U+2028


def _parse_messages(value: object, where: str) -> tuple[dict, ...]:
    ok = isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok:
        raise MoeServeError(f'{where}: "messages" must be a non-empty list of {{"role": str, "content": str}}')
    if not any(m["role"] == "user" for m in value):
        raise MoeServeError(f'{where}: "messages" has no "user" turn')
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _prompt_from_object(
    obj: object, where: str, default_id: str, default_domain: str | None
) -> Prompt | None:
    """The prompt on one .jsonl line; None when its text is blank."""
    if not isinstance(obj, dict):
        raise MoeServeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = _parse_messages(obj["messages"], where) if "messages" in obj else None
    key = "prompt" if "prompt" in obj else "text" if "text" in obj else None
    if key is not None:
        text = obj[key]
        if not isinstance(text, str):
            raise MoeServeError(f'{where}: "{key}" must be a string')
    elif messages is not None:
        text = next(m["content"] for m in messages if m["role"] == "user")
    else:
        raise MoeServeError(f'{where}: needs a "prompt", "text" or "messages" field')
    domain = obj.get("domain", default_domain)
    if domain is not None and not isinstance(domain, str):
        raise MoeServeError(f'{where}: "domain" must be a string')
    raw_id = obj.get("id", default_id)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise MoeServeError(f'{where}: "id" must be a string or an integer')
    if not text.strip():
        return None
    return Prompt(text=text, domain=domain, id=str(raw_id), messages=messages)


def read_jsonl_prompts(path: Path, id_prefix: str | None = None, default_domain: str | None = None) -> list[Prompt]:
    """Prompts from a .jsonl file, one object per line (blank lines skipped).

    A line without an "id" gets `<id_prefix>/<line number>` (prefix defaults to the file stem).
    """
    path = Path(path)
    prefix = path.stem if id_prefix is None else id_prefix
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoeServeError(f"{where}: not valid JSON ({exc.msg})") from None
        prompt = _prompt_from_object(obj, where, f"{prefix}/{number}", default_domain)
        if prompt is None:
            continue
        if prompt.id in seen:
            raise MoeServeError(f"{where}: id {prompt.id!r} already used on line {seen[prompt.id]}")
        seen[prompt.id] = number
        prompts.append(prompt)
    return prompts


def read_txt_prompts(path: Path) -> list[Prompt]:
    """One prompt per line of a .txt file, blank lines skipped; ids `<stem>/<line number>`."""
    path = Path(path)
    return [
        Prompt(text=line, domain=None, id=f"{path.stem}/{number}")
        for number, line in enumerate(_read_lines(path), start=1)
        if line.strip()
    ]
