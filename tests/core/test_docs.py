"""Every hookspec is documented (README and docstring) and has a test of its own."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from nimpipe import hookspecs

ROOT = Path(__file__).resolve().parents[2]
HOOKS = sorted(
    name
    for name, obj in vars(hookspecs).items()
    if inspect.isfunction(obj) and hasattr(obj, "nimpipe_spec")
)


def test_hooks_found() -> None:
    assert {"pre_input", "select_provider", "on_response", "post_output", "record_cost"} <= set(
        HOOKS
    )


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_in_readme_with_its_signature(name: str) -> None:
    params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    readme = (ROOT / "README.md").read_text()
    assert f"### `{name}({params})`" in readme


@pytest.mark.parametrize("name", HOOKS)
def test_hook_docstring_covers_every_parameter_and_the_return(name: str) -> None:
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    for param in inspect.signature(spec).parameters:
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
