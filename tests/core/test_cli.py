"""The command line: one-line errors with the documented exit codes, config checks, plugins.

Commands run as real subprocesses against the NIM-shaped test server on
127.0.0.1; the internal-error path (a bug, which no real input reaches) and
the stream printer's guard are unit tests of :mod:`nimpipe.cli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nimpipe import cli
from nimpipe.errors import MalformedReplyError

MODEL = "meta/llama-3.1-8b-instruct"


def fake_key() -> str:
    """A key-shaped value, built at run time (the repository holds no key-shaped literal)."""
    return "nva" + "pi-" + "Q7rT" * 10


def nimpipe(
    *args: str, cwd: Path, server: Any = None, stdin: Any = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``nimpipe ARGS`` in ``cwd`` with an isolated config directory."""
    full = {**os.environ, "XDG_CONFIG_HOME": str(cwd / "xdg"), "NIMPIPE_HOME": str(cwd / "home")}
    if server is not None:
        full |= {"NIMPIPE_BASE_URL": server.base_url, "NIMPIPE_MODEL": MODEL}
    full |= env
    done = subprocess.run(
        [sys.executable, "-m", "nimpipe.cli", *args],
        capture_output=True,
        input=stdin,
        env=full,
        cwd=cwd,
        timeout=120,
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single ``nimpipe: ...`` line on stderr (no traceback, nothing else)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("nimpipe: "), lines
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------
# chat: replies, malformed replies, errors mid-stream, blocks
# --------------------------------------------------------------------------


def test_chat_answers(nim_server: Any, tmp_path: Path) -> None:
    done = nimpipe("chat", "hi", cwd=tmp_path, server=nim_server)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert done.stdout.strip() == "NIM reply to: hi"
    done = nimpipe("chat", "--stream", "hi", cwd=tmp_path, server=nim_server)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert done.stdout == "NIM reply to: hi\n"


@pytest.mark.parametrize("stream", [False, True], ids=["run", "stream"])
@pytest.mark.parametrize(
    "body",
    [
        '{"id": "chatcmpl-x", "object": "chat.compl',  # not JSON
        {"id": "x", "object": "chat.completion", "created": 1, "model": MODEL},  # no choices
        {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": 5}}],  # content that is a number
        },
        {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": 5}}],
        },
    ],
    ids=["not-json", "no-choices", "numeric-content", "tool-calls-5"],
)
def test_malformed_replies_are_one_line_and_exit_1(
    nim_server: Any, tmp_path: Path, body: Any, stream: bool
) -> None:
    nim_server.inject("malformed", count=None, body=body)
    args = ["chat", *(["--stream"] if stream else []), "--timeout", "20", "hi"]
    done = nimpipe(*args, cwd=tmp_path, server=nim_server)
    assert done.returncode == cli.EXIT_ERROR, (done.stdout, done.stderr)
    assert one_error_line(done).startswith("nimpipe: error: ")


def test_error_mid_stream_ends_the_line_and_exits_1(nim_server: Any, tmp_path: Path) -> None:
    """Part of the answer is out when the deadline passes: the line is ended, the error is one
    line on stderr."""
    nim_server.inject("stall", count=None, after_chunks=2)
    done = nimpipe(
        "chat", "--stream", "--timeout", "1.5", "hello there", cwd=tmp_path, server=nim_server
    )
    assert done.returncode == cli.EXIT_ERROR, done.stderr
    assert done.stdout.endswith("\n") and done.stdout.strip(), repr(done.stdout)
    assert "deadline" in one_error_line(done)


def test_cut_stream_is_one_line(nim_server: Any, tmp_path: Path) -> None:
    nim_server.inject("cut_stream", count=None, chunks=2)
    done = nimpipe("chat", "--stream", "hello there", cwd=tmp_path, server=nim_server)
    assert done.returncode == cli.EXIT_ERROR, done.stderr
    assert one_error_line(done).startswith("nimpipe: error: ")


def test_echoed_key_never_reaches_the_terminal(nim_server: Any, tmp_path: Path) -> None:
    key = fake_key()
    nim_server.inject("status", count=None, status=500, message=f"upstream rejected {key}")
    done = nimpipe("chat", "--timeout", "10", "hi", cwd=tmp_path, server=nim_server)
    assert done.returncode == cli.EXIT_ERROR
    one_error_line(done)
    assert key not in done.stdout + done.stderr


def test_blocked_turn_exits_3(nim_server: Any, tmp_path: Path) -> None:
    write(tmp_path / "nimpipe.toml", '[stages.pii_redactor]\naction = "block"\n')
    done = nimpipe("chat", "my card is 4111 1111 1111 1111", cwd=tmp_path, server=nim_server)
    assert done.returncode == cli.EXIT_BLOCKED, done.stderr
    assert one_error_line(done).startswith("nimpipe: blocked by pii_redactor")


def test_prompt_that_is_not_utf8_is_a_usage_error(nim_server: Any, tmp_path: Path) -> None:
    done = nimpipe("chat", "-", cwd=tmp_path, server=nim_server, stdin=b"caf\xe9 \xff")
    assert done.returncode == cli.EXIT_USAGE
    assert "not UTF-8" in one_error_line(done)
    assert nim_server.count() == 0


def test_stream_printer_refuses_a_chunk_that_is_not_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whatever the pipeline releases, the printer never crashes on it: a typed error."""

    class Stream:
        closed = False

        def __iter__(self) -> Any:
            return iter(["NIM ", 5, "never printed"])

        def close(self) -> None:
            self.closed = True

    stream = Stream()
    with pytest.raises(MalformedReplyError, match="released a int"):
        cli._print_stream(stream)
    assert stream.closed
    assert capsys.readouterr().out == "NIM \n"


# --------------------------------------------------------------------------
# unexpected exceptions: one line and a hint, or the traceback on request
# --------------------------------------------------------------------------


def _boom(args: Any) -> int:
    raise RuntimeError("something nimpipe did not expect\nsecond line")


@pytest.mark.parametrize("how", ["default", "--debug", "env"])
def test_unexpected_exception(
    how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli._COMMANDS, "config", _boom)
    if how == "env":
        monkeypatch.setenv(cli.DEBUG_ENV, "1")
    code = cli.main([*(["--debug"] if how == "--debug" else []), "config"])
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nimpipe: internal error: RuntimeError: something nimpipe did not")
    assert "second line" in last  # the message is kept, on one line
    if how == "default":
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "--debug" in last and cli.DEBUG_ENV in last
    else:
        assert "Traceback (most recent call last)" in err and "_boom" in err


# --------------------------------------------------------------------------
# configuration errors: exit 2, naming the file, the key or the variable
# --------------------------------------------------------------------------


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "nimpipe.toml").write_bytes(b'default_route = "caf\xe9"\n')
    done = nimpipe("config", cwd=tmp_path)
    assert done.returncode == cli.EXIT_USAGE
    line = one_error_line(done)
    assert "nimpipe.toml" in line and "not UTF-8" in line


def test_dev_null_means_no_config_file(tmp_path: Path) -> None:
    write(tmp_path / "nimpipe.toml", "this is not toml\n")  # never read
    done = nimpipe("config", "--json", cwd=tmp_path, NIMPIPE_CONFIG=os.devnull)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert json.loads(done.stdout)["source"] is None
    done = nimpipe("--config", os.devnull, "config", "--json", cwd=tmp_path)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert json.loads(done.stdout)["source"] is None


def test_directory_as_config(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    done = nimpipe("config", cwd=tmp_path, NIMPIPE_CONFIG=str(folder))
    assert done.returncode == cli.EXIT_USAGE
    line = one_error_line(done)
    assert "is a directory" in line and "NIMPIPE_CONFIG" in line and str(folder) in line
    done = nimpipe("--config", str(folder), "config", cwd=tmp_path)
    assert done.returncode == cli.EXIT_USAGE
    assert "is a directory" in one_error_line(done)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[routes.a]\nbase_url = 'http://127.0.0.1:1/v1'\nmodel = 'm'\ntimeout = nan\n", "timeout"),
        (
            "[routes.a]\nbase_url = 'http://127.0.0.1:1/v1'\nmodel = 'm'\n"
            "price = { input_per_1k = inf }\n",
            "routes.a.price.input_per_1k",
        ),
        ("[stages.budget]\ndaily_usd = nan\n", "stages.budget.daily_usd"),
        ("[stages.cascade]\ncolour = 'red'\n", "stages.cascade.colour"),
        ("[stages.ghost]\n", "stages.ghost"),
        ("[stages.ghost]\nenabled = false\n", "stages.ghost"),
    ],
    ids=["nan-timeout", "inf-price", "nan-budget", "unknown-key", "unknown-stage", "disabled"],
)
def test_config_command_reports_bad_settings(tmp_path: Path, toml: str, key: str) -> None:
    write(tmp_path / "nimpipe.toml", toml)
    done = nimpipe("config", cwd=tmp_path)
    assert done.returncode == cli.EXIT_USAGE, (done.stdout, done.stderr)
    line = one_error_line(done)
    assert line.startswith("nimpipe: config error: ") and key in line and "nimpipe.toml" in line
    if key == "stages.ghost":
        assert "known: budget, cascade" in line


def test_bad_stage_setting_stops_chat_naming_the_key(nim_server: Any, tmp_path: Path) -> None:
    """The stage's own reader fails in configure: a config error (exit 2), not a hook error."""
    write(tmp_path / "nimpipe.toml", "[stages.budget]\ndaily_usd = 'lots'\n")
    done = nimpipe("chat", "hi", cwd=tmp_path, server=nim_server)
    assert done.returncode == cli.EXIT_USAGE, done.stderr
    line = one_error_line(done)
    assert "stages.budget.daily_usd" in line and "HookError" not in line and "hook" not in line
    assert nim_server.count() == 0


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NIMPIPE_STREAM_POLICY": "drip"}, "NIMPIPE_STREAM_POLICY"),
        ({"NIMPIPE_ROUTE": "ghost"}, "NIMPIPE_ROUTE"),
        ({"NIMPIPE_STAGES": "budget,ghost"}, "NIMPIPE_STAGES"),
        ({"NIMPIPE_MAX_ATTEMPTS": "many"}, "NIMPIPE_MAX_ATTEMPTS"),
        ({"NIMPIPE_OFFLINE": "perhaps"}, "NIMPIPE_OFFLINE"),
        ({"NIMPIPE_BASE_URL": "ftp://x", "NIMPIPE_MODEL": "m"}, "NIMPIPE_BASE_URL"),
    ],
)
def test_environment_errors_name_the_variable(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    write(
        tmp_path / "nimpipe.toml",
        "stream_policy = 'buffer'\ndefault_route = 'a'\n"
        "[routes.a]\nbase_url = 'http://127.0.0.1:1/v1'\nmodel = 'm'\n",
    )
    done = nimpipe("config", cwd=tmp_path, **env)
    assert done.returncode == cli.EXIT_USAGE, (done.stdout, done.stderr)
    line = one_error_line(done)
    assert f"key '{variable}'" in line and "environment" in line, line


@pytest.mark.parametrize(
    "place",
    [
        "flags = ['fast', '{key}']",
        "headers = {{ X-Extra = 'Bearer {key}' }}",
        "extra_body = {{ nvext = {{ hints = ['{key}'] }} }}",
        "flags = ['{key}', 5]",
    ],
    ids=["flags", "header", "extra-body-list", "flags-with-a-number"],
)
def test_key_anywhere_in_the_config_is_refused_without_echo(tmp_path: Path, place: str) -> None:
    key = fake_key()
    write(
        tmp_path / "nimpipe.toml",
        "[routes.a]\nbase_url = 'http://127.0.0.1:1/v1'\nmodel = 'm'\n"
        + place.format(key=key)
        + "\n",
    )
    for command in (["config"], ["config", "--json"], ["chat", "hi"]):
        done = nimpipe(*command, cwd=tmp_path)
        assert done.returncode == cli.EXIT_USAGE, (done.stdout, done.stderr)
        line = one_error_line(done)
        assert "routes.a." in line
        assert key not in done.stdout + done.stderr
        assert key[6:20] not in done.stdout + done.stderr


# --------------------------------------------------------------------------
# plugins --all
# --------------------------------------------------------------------------


def test_plugins_all_lists_what_could_be_enabled(tmp_path: Path) -> None:
    write(tmp_path / "nimpipe.toml", "[stages.cascade]\n[stages.budget]\nenabled = false\n")
    done = nimpipe("plugins", "--all", cwd=tmp_path)
    assert done.returncode == cli.EXIT_OK, done.stderr
    listed = [line for line in done.stdout.splitlines() if line[:1] in ("*", " ") and line[2:3]]
    lines = {line[2:].split()[0]: line for line in listed}
    assert lines["default_route"].startswith("* ")
    assert lines["cascade"].startswith("* ")
    assert lines["pii_redactor"].startswith("  ")
    assert "[stages.pii_redactor]" in lines["pii_redactor"]
    assert "NIMPIPE_STAGES=pii_redactor" in lines["pii_redactor"]
    assert "enabled = false" in lines["budget"] and lines["budget"].startswith("  ")
    # Without --all, only what is active.
    plain = nimpipe("plugins", cwd=tmp_path).stdout
    assert "cascade" in plain and "pii_redactor" not in plain

    done = nimpipe("plugins", "--all", "--json", cwd=tmp_path, NIMPIPE_DISABLE_PLUGINS="router")
    assert done.returncode == cli.EXIT_OK, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    from nimpipe.plugins import BUILTIN_STAGES, CONTRIB_STAGES

    assert set(BUILTIN_STAGES) | set(CONTRIB_STAGES) <= set(rows)
    assert rows["cascade"]["active"] is True and rows["cascade"]["hooks"]
    assert rows["ledger"]["active"] is False and "NIMPIPE_STAGES=ledger" in rows["ledger"]["how"]
    assert rows["router"]["active"] is False and "NIMPIPE_DISABLE_PLUGINS" in rows["router"]["how"]


# --------------------------------------------------------------------------
# Commands from stages and plugins (the register_commands hook)
# --------------------------------------------------------------------------

THIRD_PARTY = """
from nimpipe import hookimpl


def run_hello(config, args):
    print(f"hello {args.who} offline={config.offline}")
    return 0


@hookimpl
def register_commands(commands):
    hello = commands.add("hello", help="say hello from a plugin", run=run_hello)
    hello.add_argument("--who", default="world")
    {extra}
"""


def install_plugin(site: Path, name: str, extra: str = "") -> dict[str, str]:
    """A real installed distribution in ``site`` whose ``nimpipe`` entry point is module ``name``;
    returns the environment that puts it on the path and loads every entry point (the suite
    loads none by default)."""
    site.mkdir(exist_ok=True)
    (site / f"{name}.py").write_text(THIRD_PARTY.replace("{extra}", extra))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[nimpipe]\n{name} = {name}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), *sys.path]), "NIMPIPE_LOAD_PLUGINS": name}


def test_built_in_stage_commands_come_from_their_stage_modules() -> None:
    commands = cli.CommandRegistry(cli.argparse.ArgumentParser().add_subparsers())
    cli._register_stage_commands(commands)
    assert {"models", "status", "cost"} <= set(commands.names())
    from nimpipe_contrib.cost import commands as cost_commands
    from nimpipe_contrib.nim import commands as nim_commands

    assert commands.runners["models"] is nim_commands.run_models_command
    assert commands.runners["status"] is nim_commands.run_status_command
    assert commands.runners["cost"] is cost_commands.run_cost


def test_plugin_command_shows_in_help_and_runs(tmp_path: Path) -> None:
    env = install_plugin(tmp_path / "site", "hello_plugin")
    done = nimpipe("--help", cwd=tmp_path, **env)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert "say hello from a plugin" in done.stdout
    assert "models" in done.stdout and "cost" in done.stdout

    done = nimpipe("--offline", "hello", "--who", "there", cwd=tmp_path, **env)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert done.stdout.strip() == "hello there offline=True"

    # Entry points are off with NIMPIPE_LOAD_PLUGINS empty, or with the plugin disabled.
    for off in ({"NIMPIPE_LOAD_PLUGINS": ""}, {"NIMPIPE_DISABLE_PLUGINS": "hello_plugin"}):
        done = nimpipe("--help", cwd=tmp_path, **(env | off))
        assert done.returncode == cli.EXIT_OK, done.stderr
        assert "hello" not in done.stdout and "cost" in done.stdout
        done = nimpipe("hello", cwd=tmp_path, **(env | off))
        assert done.returncode == cli.EXIT_USAGE and "invalid choice" in done.stderr


@pytest.mark.parametrize("taken", ["hello", "chat", "cost"])
def test_duplicate_command_name_is_a_clear_plugin_error(tmp_path: Path, taken: str) -> None:
    extra = f'commands.add("{taken}", help="again", run=run_hello)' if taken != "hello" else ""
    env = install_plugin(tmp_path / "site", "first_plugin", extra)
    if taken == "hello":
        install_plugin(tmp_path / "site", "second_plugin")
        env["NIMPIPE_LOAD_PLUGINS"] = "first_plugin,second_plugin"
    done = nimpipe("--help", cwd=tmp_path, **env)
    assert done.returncode == cli.EXIT_USAGE, done.stderr
    line = one_error_line(done)
    assert line.startswith("nimpipe: plugin error: plugin ")
    assert f"registers command {taken!r}, which " in line and "already registers" in line
    owner = {"hello": "first_plugin", "chat": "nimpipe", "cost": "cost_commands"}[taken]
    assert f"{owner!r} already registers" in line
