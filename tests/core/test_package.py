"""Packaging promises: cheap import, no stray top-level modules, typed, quick CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nimpipe.hookspecs

import nimpipe


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_import_is_cheap_and_offline(tmp_path: Path) -> None:
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise SystemExit('network touched at import')\n"
        "socket.socket.connect = refuse\n"
        "import nimpipe, nimpipe.hookspecs\n"
        "heavy = ['openai', 'tiktoken', 'nemoguardrails', 'httpx', 'httpx2', 'nimpipe.pipeline']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_hookspecs_only_under_nimpipe(tmp_path: Path) -> None:
    done = run_python(
        "import importlib.util; print(importlib.util.find_spec('hookspecs'))", tmp_path
    )
    assert done.stdout.strip() == "None"
    assert nimpipe.hookspecs.__name__ == "nimpipe.hookspecs"


def test_ships_py_typed() -> None:
    assert (Path(nimpipe.__file__).parent / "py.typed").is_file()


def test_lazy_public_names() -> None:
    for name in nimpipe.__all__:
        assert getattr(nimpipe, name) is not None


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nimpipe.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_CONFIG_HOME": str(cwd / "xdg"), **env},
    )


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom nimpipe.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('openai', 'tiktoken', 'httpx') if m in sys.modules], file=sys.stderr)\n"
    )
    done = run_python(code, tmp_path)
    assert "usage: nimpipe" in done.stdout
    assert done.stderr.strip() == "[]"


def test_chat_command(nim_server: Any, tmp_path: Path) -> None:
    env = {"NIMPIPE_BASE_URL": nim_server.base_url, "NIMPIPE_MODEL": "meta/llama-3.1-8b-instruct"}
    done = cli("chat", "hello cli", cwd=tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "NIM reply to: hello cli"
    done = cli("chat", "streamed words here", "--stream", cwd=tmp_path, **env)
    assert done.stdout.strip() == "NIM reply to: streamed words here"
    done = cli("chat", "as json", "--json", cwd=tmp_path, **env)
    data = json.loads(done.stdout)
    assert data["text"] == "NIM reply to: as json" and data["route"] == "default"
    assert data["records"][0]["outcome"] == "ok"


def test_chat_without_route_is_a_clear_error(tmp_path: Path) -> None:
    done = cli("chat", "x", cwd=tmp_path)
    assert done.returncode == 1
    assert "no route is configured" in done.stderr


def test_plugins_command(tmp_path: Path) -> None:
    done = cli("plugins", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["default_route"]["hooks"] == ["select_provider"]
    assert rows["default_route"]["version"] == nimpipe.__version__
    text = cli("plugins", cwd=tmp_path).stdout
    assert "default_route" in text and "select_provider" in text


def test_config_command_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "nimpipe.toml").write_text(
        '[routes.hosted]\nbase_url = "https://integrate.api.nvidia.com/v1"\nmodel = "m"\n'
    )
    done = cli("config", cwd=tmp_path, NVIDIA_API_KEY="nvapi-topsecret")
    assert done.returncode == 0, done.stderr
    assert "nvapi-topsecret" not in done.stdout
    assert '"*** from $NVIDIA_API_KEY"' in done.stdout
    data = json.loads(
        cli("config", "--json", cwd=tmp_path, NVIDIA_API_KEY="nvapi-topsecret").stdout
    )
    assert data["routes"]["hosted"]["api_key"] == "*** from $NVIDIA_API_KEY"


def test_bad_config_exit_code(tmp_path: Path) -> None:
    (tmp_path / "nimpipe.toml").write_text("max_attempts = 'many'\n")
    done = cli("config", cwd=tmp_path)
    assert done.returncode == 2
    assert "nimpipe.toml: key 'max_attempts': must be an integer" in done.stderr


def test_no_credentials_are_committed() -> None:
    """No tracked file holds a credential-shaped string (tests build fake ones at run time)."""
    import shutil

    from nimpipe.redaction import API_KEY

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    found = []
    for name in filter(None, files):
        path = root / name.decode()
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        found += [f"{name.decode()}: {m.group()[:12]}..." for m in API_KEY.finditer(text)]
    assert found == []


def test_errors_never_carry_the_key() -> None:
    from nimpipe.errors import AuthenticationError
    from nimpipe.types import Route, Secret

    key = "nvapi-" + "k" * 24
    route = Route(name="r", base_url="http://127.0.0.1:1/v1", model="m", api_key=Secret(key))
    error = AuthenticationError(f"Incorrect API key provided: {key}; Bearer {key}", route=route)
    short = AuthenticationError(
        "bad key nvapi-abc123",
        route=Route(
            name="r", base_url="http://127.0.0.1:1/v1", model="m", api_key=Secret("nvapi-abc123")
        ),
    )
    for text in (str(error), repr(error), error.message, str(short)):
        assert "kkkk" not in text and "abc123" not in text
    assert "***" in str(error)


def test_every_package_of_the_source_tree_is_shipped() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"nimpipe.hookspecs"}
    for top in ("nimpipe", "nimpipe_contrib"):
        for init in (root / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(root).parts))
    assert found == listed
