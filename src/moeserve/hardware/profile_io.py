"""Reading and writing hardware profiles as YAML, and finding the shipped ones by name."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from moeserve.atomic import write_text_atomic
from moeserve.errors import MoeServeError
from moeserve.hardware.schema import HardwareProfile, profile_from_dict
from moeserve.shipped import resolve_shipped, shipped_names

_HEADER = "# moeserve hardware profile (schema: docs/profiles.md)\n"


def available_hardware_profiles() -> list[str]:
    """Names of the shipped profiles (file stems), sorted."""
    return shipped_names("hardware")


def resolve_profile_path(path_or_name: str | os.PathLike) -> Path:
    """A path to a YAML file, or a bare shipped-profile name like `a100-80gb`."""
    return resolve_shipped(path_or_name, "hardware", "hardware profile")


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


def write_profile(profile: HardwareProfile, path: str | os.PathLike) -> None:
    """Write the YAML at `path` as it is (callers make it atomic: `save_profile`, `atomic.OutputSet`)."""
    Path(path).write_text(profile_to_yaml(profile))


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
