"""docs/configuration.md names exactly the variables each process reads, in the right section.

A `##` section documents the processes `SECTION_PROCESSES` gives it (its `###` subsections
with it); each table row whose first cell is a variable in backticks counts. A nested model
of settings (the outbound policies) is documented as one row per model,
`APP_OUTBOUND_GROQ__<FIELD>`, and one per field, `APP_OUTBOUND_<POLICY>__ATTEMPT_TIMEOUT`.
Every pydantic-settings class of the project must be one a process here reads.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from pydantic import AliasChoices, BaseModel
from pydantic_settings import BaseSettings

from app.outbound import OutboundSettings
from app.settings import AppSettings
from edge.settings import EdgeSettings
from sim.settings import SimSettings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"

PROCESSES: dict[str, list[type[BaseSettings]]] = {
    "edge": [EdgeSettings],
    "app": [AppSettings, OutboundSettings],
    "sim": [SimSettings],
}
SECTION_PROCESSES = {
    "Edge and app": {"edge", "app"},
    "Edge (`python -m edge`)": {"edge"},
    "App (`python -m app`)": {"app"},
    "Provider simulator (`python -m sim`)": {"sim"},
}


def environment_names(settings_class: type[BaseSettings]) -> set[str]:
    """The variables a settings class reads, as the reference writes them."""
    prefix = settings_class.model_config.get("env_prefix", "")
    nested_delimiter = settings_class.model_config.get("env_nested_delimiter")
    names: set[str] = set()
    for field_name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        model = field.annotation
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        elif nested_delimiter and isinstance(model, type) and issubclass(model, BaseModel):
            names.add(f"{prefix}{field_name}{nested_delimiter}".upper() + "<FIELD>")
            names.update(f"{prefix.upper()}<POLICY>{nested_delimiter}{name.upper()}" for name in model.model_fields)
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def documented_sections() -> dict[str, set[str]]:
    """The variables of each `##` section of the reference."""
    sections: dict[str, set[str]] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line.removeprefix("## ").strip()
        elif line.startswith("| `"):
            sections.setdefault(section, set()).add(line.split("`")[1])
    return sections


def read_by(process: str) -> set[str]:
    return set().union(*(environment_names(settings_class) for settings_class in PROCESSES[process]))


def documented_for(process: str) -> set[str]:
    return set().union(
        *(names for section, names in documented_sections().items() if process in SECTION_PROCESSES.get(section, ()))
    )


def test_every_section_of_variables_names_its_processes() -> None:
    unknown = set(documented_sections()) - set(SECTION_PROCESSES)
    assert not unknown, f"sections of docs/configuration.md without processes in SECTION_PROCESSES: {sorted(unknown)}"


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_every_variable_a_process_reads_is_documented_for_it(process: str) -> None:
    missing = read_by(process) - documented_for(process)
    assert not missing, f"read by {process} but not documented for it in docs/configuration.md: {sorted(missing)}"


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_nothing_is_documented_for_a_process_that_it_does_not_read(process: str) -> None:
    stale = documented_for(process) - read_by(process)
    assert not stale, f"documented for {process} in docs/configuration.md but not read by it: {sorted(stale)}"


def settings_classes() -> list[type[BaseSettings]]:
    """Every class of the project's processes that derives from `BaseSettings`."""
    bases: dict[tuple[str, str], set[str]] = {}
    for package in ("app", "edge", "sim", "common"):
        for source in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(source.relative_to(ROOT).with_suffix("").parts)
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.ClassDef):
                    names = {base.id if isinstance(base, ast.Name) else ast.unparse(base) for base in node.bases}
                    bases[(module, node.name)] = names
    settings = {"BaseSettings"}
    while grown := {name for (_, name), of in bases.items() if of & settings and name not in settings}:
        settings |= grown
    return [
        getattr(importlib.import_module(module), name)
        for (module, name) in sorted(bases)
        if name in settings and name != "BaseSettings"
    ]


def test_every_settings_class_is_read_by_a_process_here() -> None:
    covered = [settings_class for classes in PROCESSES.values() for settings_class in classes]
    uncovered = [
        settings_class.__qualname__
        for settings_class in settings_classes()
        if not any(issubclass(read, settings_class) for read in covered)
    ]
    assert settings_classes(), "no settings class found: the search is broken"
    assert not uncovered, f"settings classes missing from PROCESSES: {uncovered}"
