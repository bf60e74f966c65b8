"""Model cards: config.json files written from published architecture numbers, shipped under
`moeserve/assets/cards/<name>/` with a `card.json` naming where each number came from.

A card has no weights: it is enough for `inspect` (geometry on the meta device), `profile --hardware`
(random weights of the card's shapes), `trace synth` and `plan`. The one place a card name becomes a
directory is `card_dir`, which `models.loading.resolve_model_path` calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moeserve.errors import MoeServeError

CARDS_DIR = Path(__file__).resolve().parent.parent / "assets" / "cards"
CARD_FILE = "card.json"


@dataclass(frozen=True)
class ModelCard:
    """Provenance of a shipped config: the model it describes and what was taken from where."""

    name: str
    model_id: str
    source_url: str
    paper: str
    taken: str
    written_from: str
    notes: str = ""


def card_names() -> list[str]:
    """Names of the shipped cards, sorted."""
    if not CARDS_DIR.is_dir():
        return []
    return sorted(p.name for p in CARDS_DIR.iterdir() if (p / "config.json").is_file())


def is_card_name(spec: str) -> bool:
    return spec in card_names()


def card_dir(name: str) -> Path:
    """The folder of the shipped card `name` (holds config.json and card.json)."""
    if not is_card_name(name):
        raise MoeServeError(f"unknown model card {name!r} (shipped: {', '.join(card_names()) or 'none'})")
    return CARDS_DIR / name


def load_card(name: str) -> ModelCard:
    """The provenance record of the shipped card `name`."""
    path = card_dir(name) / CARD_FILE
    try:
        return ModelCard(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise MoeServeError(f"{path}: unreadable model card ({exc}); broken install?") from None


def looks_like_name(spec: str) -> bool:
    """A bare word (no path separator, no dot prefix): meant as a shipped name rather than a path."""
    return "/" not in spec and "\\" not in spec and not spec.startswith((".", "~"))
