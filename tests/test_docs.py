"""The configuration reference must name every setting each process reads."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from app.settings import AppSettings
from edge.settings import EdgeSettings
from sim.settings import SimSettings

SETTINGS: list[type[BaseSettings]] = [EdgeSettings, AppSettings, SimSettings]

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def environment_names(settings_class: type[BaseSettings]) -> set[str]:
    prefix = settings_class.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field_name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def documented_names() -> set[str]:
    names: set[str] = set()
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            names.add(line.split("`")[1])
    return names


def read_names() -> set[str]:
    return set().union(*(environment_names(settings_class) for settings_class in SETTINGS))


def test_every_setting_is_documented() -> None:
    missing = read_names() - documented_names()
    assert not missing, f"not in docs/configuration.md: {sorted(missing)}"


def test_nothing_documented_that_no_process_reads() -> None:
    stale = documented_names() - read_names()
    assert not stale, f"documented but not read: {sorted(stale)}"
