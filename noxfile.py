"""Development sessions: ``nox -s tests`` runs the suite, ``nox -s demo`` the demo."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
OPENAI_MAJORS = ["2", "3"]


def install_embedded_model(session: nox.Session) -> None:
    """Build the local llama.cpp model server once (cached under ~/.cache/nimpipe)."""
    session.run("python", "-m", "nimpipe.embedded", "install")


def tests_impl(session: nox.Session, openai_major: str, *pytest_args: str) -> None:
    """Install nimpipe with its test extras and one openai major version, then run pytest."""
    upper = int(openai_major) + 1
    session.install("-e", ".[testing]", f"openai>={openai_major},<{upper}", "pytest-timeout")
    install_embedded_model(session)
    session.run(
        "pytest",
        *pytest_args,
        *session.posargs,
        env={"NIMPIPE_REQUIRE_LLAMA": "1", "NEMO_GUARDRAILS_NO_USAGE_STATS": "1"},
    )


@nox.session(python=PYTHON)
@nox.parametrize("openai", OPENAI_MAJORS)
def tests(session: nox.Session, openai: str) -> None:
    """The whole suite against real local servers, on openai 2.x and 3.x."""
    tests_impl(session, openai)


@nox.session(python=PYTHON)
def live(session: nox.Session) -> None:
    """Re-record the cassettes from the real local llama.cpp server."""
    tests_impl(session, "3", "-m", "live", "--nimpipe-record=all")
    session.run("nimpipe", "demo", "--record")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: run turns through the pipeline on the embedded local model."""
    session.install("-e", ".[testing]")
    install_embedded_model(session)
    session.run("nimpipe", "demo", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the code, tests, benchmarks and this file."""
    session.install("ruff>=0.6")
    session.run(
        "ruff",
        "check",
        "nimpipe",
        "nimpipe_contrib",
        "hookspecs",
        "tests",
        "benchmarks",
        "noxfile.py",
    )
    session.run("ruff", "format", "--check", "nimpipe", "nimpipe_contrib", "hookspecs")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    session.install("-e", ".[testing]", "mypy>=1.10")
    session.run("mypy")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: pipeline overhead, import time, async throughput."""
    session.install("-e", ".[testing]")
    session.run("python", "benchmarks/overhead.py", *session.posargs)
    session.run("python", "benchmarks/throughput.py", *session.posargs)
    session.run("python", "benchmarks/startup.py", *session.posargs)
