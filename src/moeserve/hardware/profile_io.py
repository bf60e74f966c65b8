"""Reading and writing hardware profiles as YAML, and finding the shipped ones by name."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from moeserve.atomic import write_text_atomic
from moeserve.errors import MoeServeError
from moeserve.hardware.schema import HardwareProfile, profile_from_dict

_HEADER = "# moeserve hardware profile (schema: docs/profiles.md)\n"


def shipped_profile_dirs() -> list[Path]:
    """Where shipped profiles live: the repo's profiles/hardware (source checkout) and the wheel's copy."""
    package = Path(__file__).resolve().parent.parent  # .../moeserve
    return [package.parent.parent / "profiles" / "hardware", package / "_profiles" / "hardware"]


def available_hardware_profiles() -> list[str]:
    """Names of the shipped profiles (file stems), sorted."""
    names = set()
    for d in shipped_profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_profile_path(path_or_name: str | os.PathLike) -> Path:
    """A path to a YAML file, or a bare shipped-profile name like `a100-80gb`."""
    text = str(path_or_name)
    path = Path(text).expanduser()
    looks_like_path = os.sep in text or text.endswith((".yaml", ".yml")) or path.exists()
    if looks_like_path:
        if not path.is_file():
            raise MoeServeError(f"hardware profile not found: {path}")
        return path
    for d in shipped_profile_dirs():
        candidate = d / f"{text}.yaml"
        if candidate.is_file():
            return candidate
    names = ", ".join(available_hardware_profiles()) or "none"
    raise MoeServeError(f"unknown hardware profile {text!r} (shipped: {names}; or give a path to a .yaml file)")


class _Dumper(yaml.SafeDumper):
    """Lists of plain numbers on one line; everything else block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(isinstance(v, (int, float, bool)) or v is None for v in data) and len(data) > 0
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def profile_to_yaml(profile: HardwareProfile) -> str:
    return _HEADER + yaml.dump(profile.to_dict(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def save_profile(profile: HardwareProfile, path: str | os.PathLike) -> None:
    """Write `profile` to `path` as YAML, atomically."""
    write_text_atomic(path, profile_to_yaml(profile))


def load_hardware_profile(path_or_name: str | os.PathLike) -> HardwareProfile:
    """Load and validate a profile from a path or a shipped name. MoeServeError if malformed."""
    path = resolve_profile_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MoeServeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise MoeServeError(f"{path}: not a text file") from None
    try:
        return profile_from_dict(data)
    except MoeServeError as exc:
        raise MoeServeError(f"{path}: {exc}") from None
