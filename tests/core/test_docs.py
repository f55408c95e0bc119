"""Every hook on the plugin manager is documented and has a test of its own.

The walk covers the core's hookspecs and the hooks that stages declare
through ``addhooks``: the specs are read from a plugin manager on which every
contrib stage is registered, as a pipeline that enables them all has it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy
import pytest

from nimpipe import hookspecs
from nimpipe.plugins import CONTRIB_STAGES, Plugins

ROOT = Path(__file__).resolve().parents[2]


def _specs() -> dict[str, Callable[..., Any]]:
    plugins = Plugins()
    for name, module in CONTRIB_STAGES.items():
        plugins.register(importlib.import_module(module).create_plugin(), name)
    found = {}
    for name, caller in vars(plugins.pm.hook).items():
        if isinstance(caller, pluggy.HookCaller) and caller.spec is not None:
            found[name] = caller.spec.function
    return found


SPECS = _specs()
HOOKS = sorted(SPECS)
CORE = sorted(name for name in HOOKS if getattr(hookspecs, name, None) is SPECS[name])
DECLARED = sorted(set(HOOKS) - set(CORE))


def _signature(name: str) -> str:
    params = (p for p in inspect.signature(SPECS[name]).parameters if p != "self")
    return f"{name}({', '.join(params)})"


def test_hooks_found() -> None:
    assert {"pre_input", "select_provider", "on_response", "post_output", "record_cost"} <= set(
        CORE
    )
    # Stages declare hooks of their own; the walk sees them.
    assert {"nim_catalog", "nim_status", "cost_summary", "guardrails_check_input"} <= set(
        DECLARED
    )


@pytest.mark.parametrize("name", CORE)
def test_core_hook_is_in_readme_with_its_signature(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"### `{_signature(name)}`" in readme


@pytest.mark.parametrize("name", DECLARED)
def test_stage_hook_is_in_the_docs_with_its_signature(name: str) -> None:
    docs = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    flat = " ".join(docs.split())
    assert f"`{_signature(name)}`" in flat, f"{name}: signature not in docs/"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_docstring_covers_every_parameter_and_the_return(name: str) -> None:
    spec = SPECS[name]
    doc = inspect.getdoc(spec) or ""
    for param in inspect.signature(spec).parameters:
        if param != "self":
            assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"
    assert ":return:" in doc
    convention = ("*Chained*", "Stops at first non-None result", "*Collected*")
    assert any(c in doc for c in convention), f"{name}: calling convention unstated"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_test(name: str) -> None:
    sources = "\n".join(
        p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_docs.py"
    )
    assert f"def {name}(" in sources, f"no test implements hook {name}"
