"""Secrets never leak, whatever a hostile server echoes back.

The echo server (``echo_servers.py``) quotes the key it is sent in 401, 429
and 500 bodies, SSE error events, response headers, NemoGuard verdicts, NeMo
Guardrails rails and guarded generations.  Every turn runs in the four modes
(run, arun, stream, astream) with the guardrails stage on an echoing backend,
the ledger on SQLite and a vcrpy cassette recording; then everything that came
out is scanned for the keys: each exception and every exception in its
``__cause__``/``__context__`` chain (``str``, ``repr``, attributes,
``traceback.format_exception``, and the chain as Python's default excepthook
prints it), every log record at DEBUG, the results and verdicts, the cassette
file, every row of the ledger database, and ``nimpipe chat`` (plain,
``--json``, ``--stream``, and under DEBUG logging) run as a subprocess.

The keys are built at run time: the route's is not key-shaped (only the
registry of :class:`~nimpipe.types.Secret` values can catch it), the
guardrails backends' is.  A needle is the key, its URL-encoded and base64
forms, and every 16-character piece of its random part (a key cut in half by a
truncated message still leaks).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
from support.echo_servers import GUARD_MODES, ROUTE_MODES, EchoServer

from nimpipe.config import Config
from nimpipe.pipeline import Pipeline
from nimpipe.types import Route, Secret, Turn

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("run", "arun", "stream", "astream")
ROUTE_ENV = "ECHO_TEST_ROUTE_KEY"
GUARD_ENV = "ECHO_TEST_GUARD_KEY"

#: The route's key: distinctive, not credential-shaped.
ROUTE_KEY = "echo-" + secrets.token_hex(16)
#: The guardrails backends' key: credential-shaped (NVIDIA's form), built here.
GUARD_KEY = "nvapi" + "-" + secrets.token_urlsafe(33).replace("-", "x").replace("_", "y")
#: Another guardrails key, not credential-shaped.
GUARD_PLAIN_KEY = "guard-" + secrets.token_hex(16)

#: Every place scanned, for the summary line (``-s`` shows it).
SCANNED: list[str] = []


def _base64_pieces(key: str) -> set[str]:
    """Base64 text that encodes only bytes of ``key``, at each of the three alignments."""
    pieces = set()
    for offset in range(3):
        encoded = base64.b64encode(b"#" * offset + key.encode()).decode()
        core = encoded[4:-4]  # drop the groups that mix in other bytes
        pieces |= {core, core.replace("+", "-").replace("/", "_")}
    return pieces


def needles(key: str) -> dict[str, str]:
    """What counts as a leak of ``key``: label -> text."""
    found = {"the key": key, "the key, URL-encoded": quote(key, safe="")}
    for piece in _base64_pieces(key):
        found[f"the key in base64 ({piece[:6]}...)"] = piece
    random_part = key.split("-", 1)[1]
    for start in range(len(random_part) - 15):
        found[f"16 characters of the key from {start}"] = random_part[start : start + 16]
    return found


NEEDLES = {
    **needles(ROUTE_KEY),
    **{f"guard: {k}": v for k, v in needles(GUARD_KEY).items()},
    **{f"plain guard: {k}": v for k, v in needles(GUARD_PLAIN_KEY).items()},
}


@attrs.define
class Scan:
    """Texts collected from one scenario, each under a label saying where it came from."""

    places: list[tuple[str, str]] = attrs.field(factory=list)

    def add(self, label: str, text: Any) -> None:
        self.places.append((label, text if isinstance(text, str) else repr(text)))

    def add_exception(self, label: str, exc: BaseException) -> None:
        """The exception, its chain as traceback reads it, and its chain as printed raw."""
        self.add(f"{label}: traceback.format_exception", "".join(traceback.format_exception(exc)))
        for index, link in enumerate(_chain(exc, raw=False)):
            self.add(f"{label}: chain[{index}] str", _text(str, link))
            self.add(f"{label}: chain[{index}] repr", _text(repr, link))
            self.add(
                f"{label}: chain[{index}] attributes", _text(repr, getattr(link, "__dict__", {}))
            )
        for index, link in enumerate(_chain(exc, raw=True)):
            # What Python 3.11's default excepthook (C code, no attribute lookup) prints.
            self.add(f"{label}: raw chain[{index}] str", _text(str, link))
            self.add(f"{label}: raw chain[{index}] repr", _text(repr, link))

    def leaks(self, *, count: bool = True) -> dict[str, list[str]]:
        """Each place that holds a needle, with the needles it holds (empty: no leak)."""
        if count:
            SCANNED.extend(label for label, _ in self.places)
        found: dict[str, list[str]] = {}
        for label, text in self.places:
            hits = [what for what, needle in NEEDLES.items() if needle in text]
            if hits:
                found[label] = hits[:3] + ([f"and {len(hits) - 3} more"] if len(hits) > 3 else [])
        return found


def _text(show: Callable[[Any], str], value: Any) -> str:
    try:
        return show(value)
    except Exception as exc:  # a failing __str__ is no leak, but say so
        return f"<{type(exc).__name__}>"


_CAUSE: Any = BaseException.__dict__["__cause__"]
_CONTEXT: Any = BaseException.__dict__["__context__"]


def _chain(exc: BaseException, *, raw: bool) -> Iterator[BaseException]:
    """``exc`` and the exceptions it is chained to (through attributes, or as stored)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 64:
        link = todo.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        if raw:
            todo.append(_CAUSE.__get__(link))
            if not link.__suppress_context__:
                todo.append(_CONTEXT.__get__(link))
        else:
            todo += [link.__cause__, link.__context__]


@pytest.fixture(scope="module")
def echo(request: pytest.FixtureRequest) -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and SCANNED:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nsecrets scan: {len(SCANNED)} places scanned")


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys in the environment."""
    monkeypatch.setenv(ROUTE_ENV, ROUTE_KEY)
    monkeypatch.setenv(GUARD_ENV, GUARD_KEY)


@pytest.fixture(params=["key-shaped", "plain"])
def guard_keys(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys in the environment; the guardrails key credential-shaped or not."""
    monkeypatch.setenv(ROUTE_ENV, ROUTE_KEY)
    monkeypatch.setenv(GUARD_ENV, GUARD_KEY if request.param == "key-shaped" else GUARD_PLAIN_KEY)


def guardrails_settings(echo: EchoServer, mode: str, backend: str) -> dict[str, Any]:
    """``[stages.guardrails]`` with one backend at ``/{mode}`` of the echo server."""
    root = f"{echo.url}/{mode}"
    if backend == "content_safety":
        service = {"base_url": f"{root}/v1", "model": "cs", "api_key_env": GUARD_ENV}
        return {"backends": [backend], backend: service}
    if backend == "topic_control":
        service = {
            "base_url": f"{root}/v1",
            "model": "tc",
            "api_key_env": GUARD_ENV,
            "system_prompt": "Only talk about the weather.",
        }
        return {"backends": [backend], backend: service}
    if backend == "jailbreak":
        return {"backends": [backend], backend: {"url": root, "api_key_env": GUARD_ENV}}
    settings: dict[str, Any] = {"backends": ["microservice"], "url": root, "api_key_env": GUARD_ENV}
    if backend == "generation":
        settings["approach"] = "generation"
    else:
        settings["input_mode"] = "sequential"  # a rewrite applies only before the call
    return settings


def make_pipeline(echo: EchoServer, route_mode: str, guardrails: dict[str, Any], tmp: Path) -> Any:
    data = {"stages": {"guardrails": guardrails, "ledger": {"path": str(tmp / "ledger.sqlite")}}}
    route = Route(
        name="echo",
        base_url=echo.base_url(route_mode),
        model="echo-model",
        api_key=Secret(ROUTE_KEY),
        api_key_env=ROUTE_ENV,
        max_retries=0,
        timeout=10.0,
    )
    config = Config.from_dict(data, env={}).with_routes(route, default="echo")
    return Pipeline.create(config, entrypoints=False)


def drive(pipeline: Any, entry: str) -> Any:
    """One turn through ``entry``; returns the result, or raises what the pipeline raised."""
    turn = Turn.create("Say hello.", timeout=15.0, params={"max_tokens": 8})
    if entry == "run":
        return pipeline.run(turn)
    if entry == "stream":
        stream = pipeline.stream(turn)
        chunks = list(stream)
        return stream.result, chunks

    async def main() -> Any:
        if entry == "arun":
            return await pipeline.arun(turn)
        stream = pipeline.astream(turn)
        chunks = [chunk async for chunk in stream]
        return stream.result, chunks

    return asyncio.run(main())


def run_scenario(
    echo: EchoServer,
    route_mode: str,
    guardrails: dict[str, Any],
    entry: str,
    tmp: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    model_called: bool = True,
) -> Scan:
    """Drive one turn under a recording cassette, then collect everything it left behind.

    ``model_called``: the turn reaches the model, so the ledger must hold its record
    (a blocked input makes no call and no record).
    """
    import vcr

    from nimpipe.cassettes import vcr_settings

    scan = Scan()
    settings = vcr_settings(tmp, "all")
    settings.pop("cassette_library_dir")
    cassette = tmp / "echo.yaml"
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("tests.secrets")
    pipeline = make_pipeline(echo, route_mode, guardrails, tmp)
    stage = pipeline.plugins.pm.get_plugin("guardrails")
    try:
        with vcr.VCR(**settings).use_cassette(str(cassette)):
            try:
                outcome = drive(pipeline, entry)
            except Exception as exc:
                log.exception("the turn failed")
                log.debug("the error: %r (%s)", exc, exc)
                scan.add_exception(f"{entry} error", exc)
            else:
                scan.add(f"{entry} result", outcome)
                result = outcome[0] if isinstance(outcome, tuple) else outcome
                if result is not None:
                    scan.add(f"{entry} result as dict", _text(repr, attrs.asdict(result)))
                    log.info("result: %r", result)
        scan.add("guardrails verdict log", stage.verdict_log.all())
    finally:
        pipeline.close()
    scan.add("log records at DEBUG (caplog.text)", caplog.text)
    scan.add("log records at DEBUG (messages)", "\n".join(r.getMessage() for r in caplog.records))
    if cassette.exists():
        text = cassette.read_text()
        scan.add("cassette file", text)
        scan.add("cassette strings", "\n".join(_strings(_yaml(text))))
    database = tmp / "ledger.sqlite"
    if model_called or database.exists():
        with sqlite3.connect(database) as db:
            dump = "\n".join(db.iterdump())
        if model_called:
            assert "INSERT INTO" in dump, "the ledger holds no row"
        scan.add("ledger database dump", dump)
    return scan


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _strings(value: Any) -> Iterator[str]:
    """Every string in a parsed cassette (bytes decoded), however YAML folded it."""
    if isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


# ----------------------------------------------------------------------
# the scan
# ----------------------------------------------------------------------


#: Route behaviours whose leak is the provider's to fix, with where.
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mode", ROUTE_MODES)
def test_a_route_that_echoes_its_key_leaks_nothing(
    echo: EchoServer,
    keys: None,
    mode: str,
    entry: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guardrails = guardrails_settings(echo, "cs-safe", "content_safety")
    scan = run_scenario(echo, mode, guardrails, entry, tmp_path, caplog)
    assert scan.leaks() == {}
    assert len(scan.places) >= 8


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("mode", "backend"), GUARD_MODES)
def test_a_guardrails_backend_that_echoes_its_key_leaks_nothing(
    echo: EchoServer,
    guard_keys: None,
    mode: str,
    backend: str,
    entry: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guardrails = guardrails_settings(echo, mode, backend)
    scan = run_scenario(echo, "ok", guardrails, entry, tmp_path, caplog, model_called=False)
    assert scan.leaks() == {}
    if mode not in ("cs-safe", "nemo-rewrite"):
        # What the backend said did reach a reason or a verdict, masked.
        judged = [text for label, text in scan.places if label.startswith((entry, "guardrails"))]
        assert any("***" in text for text in judged), "no masked echo in a reason or verdict"


def test_the_echo_server_does_echo(echo: EchoServer) -> None:
    """The scan can fail: without scrubbing, the key is in what the server sends back."""
    import httpx

    headers = {"Authorization": f"Bearer {ROUTE_KEY}"}
    for mode in ("401", "500", "ok"):
        reply = httpx.post(
            f"{echo.base_url(mode)}/chat/completions",
            json={"model": "m", "messages": []},
            headers=headers,
        )
        assert ROUTE_KEY in reply.headers["x-request-id"]
        if mode != "ok":
            assert ROUTE_KEY in reply.text and quote(ROUTE_KEY, safe="") in reply.text
    reply = httpx.post(
        f"{echo.base_url('sse-error')}/chat/completions",
        json={"model": "m", "messages": [], "stream": True},
        headers=headers,
    )
    assert ROUTE_KEY in reply.text.split("\n\n")[1]
    planted = Scan()
    planted.add("a planted leak", f"prefix {base64.b64encode(b'user:' + ROUTE_KEY.encode())}")
    planted.add("a planted cut", f"bad key {GUARD_KEY[:30]}")
    assert len(planted.leaks(count=False)) == 2


# ----------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------


def _config(echo: EchoServer, tmp: Path, route_mode: str, guard: tuple[str, str]) -> Path:
    settings = guardrails_settings(echo, *guard)
    lines = [
        "[routes.echo]",
        f'base_url = "{echo.base_url(route_mode)}"',
        'model = "echo-model"',
        f'api_key_env = "{ROUTE_ENV}"',
        "max_retries = 0",
        "",
        "[stages.ledger]",
        f'path = "{tmp / "ledger.sqlite"}"',
        "",
        "[stages.guardrails]",
    ]
    tables = []
    for key, value in settings.items():
        if isinstance(value, dict):
            tables.append(f"\n[stages.guardrails.{key}]")
            tables += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path = tmp / "nimpipe.toml"
    path.write_text("\n".join(lines + tables) + "\n")
    return path


def _cli(tmp: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    """``nimpipe ARGS`` in ``tmp``; ``debug``: with tracebacks, hook traces and DEBUG logging."""
    env = {**os.environ, ROUTE_ENV: ROUTE_KEY, GUARD_ENV: GUARD_KEY, "NIMPIPE_LOAD_PLUGINS": ""}
    env["NIMPIPE_HOME"] = str(tmp / "home")
    if debug:
        env.update(NIMPIPE_DEBUG="1", NIMPIPE_TRACE="1")
        code = (
            "import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stderr); "
            "from nimpipe.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        command = [sys.executable, "-c", code, *args]
    else:
        command = [sys.executable, "-m", "nimpipe.cli", *args]
    return subprocess.run(
        command, cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False
    )


#: (route behaviour, guardrails behaviour): one echo of each kind.
CLI_CASES = {
    "route-401": ("401", ("cs-safe", "content_safety")),
    "route-sse-error": ("sse-error", ("cs-safe", "content_safety")),
    "cs-unsafe-out": ("ok", ("cs-unsafe-out", "content_safety")),
    "nemo-block": ("ok", ("nemo-block", "microservice")),
    "gen-401": ("ok", ("gen-401", "generation")),
}


@pytest.mark.parametrize(("route_mode", "guard"), CLI_CASES.values(), ids=CLI_CASES.keys())
def test_nimpipe_chat_leaks_nothing(
    echo: EchoServer, route_mode: str, guard: tuple[str, str], tmp_path: Path
) -> None:
    _config(echo, tmp_path, route_mode, guard)
    scan = Scan()
    runs = {
        "chat": _cli(tmp_path, "chat", "Say hello."),
        "chat --json": _cli(tmp_path, "chat", "--json", "Say hello."),
        "chat --stream": _cli(tmp_path, "chat", "--stream", "Say hello."),
        "chat --json at DEBUG": _cli(tmp_path, "chat", "--json", "Say hello.", debug=True),
        "chat --stream at DEBUG": _cli(tmp_path, "chat", "--stream", "Say hello.", debug=True),
    }
    for name, done in runs.items():
        scan.add(f"nimpipe {name}: stdout", done.stdout)
        scan.add(f"nimpipe {name}: stderr", done.stderr)
        assert done.returncode in (0, 1, 3), done.stderr
        if "DEBUG" not in name:
            assert "Traceback" not in done.stderr, done.stderr
    database = tmp_path / "ledger.sqlite"
    assert database.exists() or guard[0] == "nemo-block", "no model call was recorded"
    if database.exists():  # a blocked input makes no call, so no record
        cost = _cli(tmp_path, "cost", "--json")
        assert cost.returncode == 0, cost.stderr
        scan.add("nimpipe cost --json", cost.stdout + cost.stderr)
        with sqlite3.connect(database) as db:
            scan.add("ledger database dump", "\n".join(db.iterdump()))
    assert scan.leaks() == {}
    assert any(done.returncode != 0 for done in runs.values()), "the hostile server did no harm"


def test_an_uncaught_error_prints_no_key(echo: EchoServer, tmp_path: Path) -> None:
    """What Python's own excepthook prints for an error nobody catches (a script's last words)."""
    script = f"""
import os
from nimpipe.config import Config
from nimpipe.pipeline import Pipeline
from nimpipe.types import Route, Secret, Turn
routes = [
    Route(name=mode, base_url="{echo.url}/" + mode + "/v1", model="m",
          api_key=Secret(os.environ["{ROUTE_ENV}"]), max_retries=0)
    for mode in ("401", "500-text", "sse-error")
]
config = Config.from_dict({{}}, env={{}}).with_routes(*routes, default="401")
pipeline = Pipeline.create(config, entrypoints=False)
which = os.environ["WHICH"]
turn = Turn.create("hi", route=which, timeout=10)
if which == "sse-error":
    list(pipeline.stream(turn))
else:
    pipeline.run(turn)
"""
    scan = Scan()
    for which in ("401", "500-text", "sse-error"):
        env = {**os.environ, ROUTE_ENV: ROUTE_KEY, "WHICH": which, "NIMPIPE_LOAD_PLUGINS": ""}
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr
        scan.add(f"uncaught error from {which}: stderr", done.stderr)
    assert scan.leaks() == {}


# ----------------------------------------------------------------------
# the pieces: Secret, errors, scrubbing, log records
# ----------------------------------------------------------------------


def test_asdict_and_astuple_keep_the_key_masked() -> None:
    import copy
    import pickle

    route = Route(name="r", base_url="http://127.0.0.1:1/v1", model="m", api_key=ROUTE_KEY)
    assert isinstance(route.api_key, Secret), "a plain string key is wrapped"
    as_dict = attrs.asdict(route)
    assert isinstance(as_dict["api_key"], Secret)
    for text in (
        json.dumps(as_dict, default=str),
        repr(attrs.astuple(route)),
        repr(route),
        str(route.api_key),
        f"{route.api_key}",
    ):
        assert ROUTE_KEY not in text and "***" in text
    assert route.api_key.reveal() == ROUTE_KEY
    assert route.api_key == Secret(ROUTE_KEY) and hash(route.api_key) == hash(Secret(ROUTE_KEY))
    assert route.api_key != Secret(ROUTE_KEY + "x")
    assert pickle.loads(pickle.dumps(route)) == route
    assert copy.deepcopy(route).api_key.reveal() == ROUTE_KEY
    with pytest.raises(AttributeError):
        route.api_key._value = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Secret(None)  # type: ignore[arg-type]


def _every_error(key: str) -> list[BaseException]:
    """One instance of every nimpipe exception class, each given the key in every argument."""
    import nimpipe.errors as errors
    from nimpipe.types import Block

    route = Route(name="r", base_url="http://127.0.0.1:1/v1", model="m")
    made: list[BaseException] = [
        errors.NimpipeError(f"plain {key}", {"key": key}),
        errors.ConfigError(f"bad {key}", path=f"/tmp/{key}", key=key),
        errors.PluginLoadError(f"cannot load {key}", plugin=key),
        errors.HookError(plugin=key, hook="h", cause=ValueError(key)),
        errors.NoRouteError(f"none for {key}", turn_id=key),
        errors.BlockedError(Block(reason=f"reason {key}", plugin=key, rule=key, message=key)),
        errors.DeadlineExceededError(f"late {key}", turn_id=key),
        errors.CancelledError(f"cancelled {key}", turn_id=key),
        errors.OfflineError(f"refused {key}", host=key),
        errors.BackendUnavailable(key, f"down: {key}"),
        errors.PrometheusParseError(f"bad {key}", line_number=1, line=key),
        errors.RedactedError(ValueError(f"original {key}")),
    ]
    for name in errors.__all__:
        kind = getattr(errors, name)
        if isinstance(kind, type) and issubclass(kind, errors.ProviderError):
            made.append(kind(f"HTTP 401: {key}", route=route, body={"error": {"message": key}}))
    covered = {type(e) for e in made}
    classes = {
        getattr(errors, n)
        for n in errors.__all__
        if isinstance(getattr(errors, n), type) and issubclass(getattr(errors, n), Exception)
    }
    assert classes <= covered, f"untested: {classes - covered}"
    return made


@pytest.mark.parametrize("key", [ROUTE_KEY, GUARD_KEY], ids=["registered", "key-shaped"])
def test_every_nimpipe_error_scrubs_its_args_attributes_str_and_repr(key: str) -> None:
    Secret(ROUTE_KEY)  # registered, as every route key is
    for error in _every_error(key):
        error.extra_note = {"detail": [key]}  # an attribute set later is scrubbed too
        scan = Scan()
        scan.add("str", str(error))
        scan.add("repr", repr(error))
        scan.add("args", repr(error.args))
        scan.add("attributes", repr(vars(error)))
        scan.add_exception("error", error)
        assert scan.leaks(count=False) == {}, type(error).__name__
        assert "***" in str(error) or "***" in repr(vars(error)), type(error).__name__


def test_a_chained_exception_is_replaced_only_when_it_would_show_a_secret() -> None:
    from nimpipe.errors import RedactedError, UnavailableError, redacted

    Secret(ROUTE_KEY)
    clean = ConnectionRefusedError("connection refused")
    try:
        raise UnavailableError("cannot reach the host") from clean
    except UnavailableError as error:
        assert error.__cause__ is clean, "a chained exception that shows no secret is kept"
    try:
        try:
            raise OSError(f"during {ROUTE_KEY}")
        except OSError:
            raise KeyError(f"no such key {ROUTE_KEY}")  # noqa: B904 - chained implicitly
    except KeyError as dirty:
        caught = dirty
    try:
        raise UnavailableError("lost") from caught
    except UnavailableError as error:
        stand_in = error.__cause__
        assert isinstance(stand_in, RedactedError) and stand_in is error.__cause__
        assert stand_in.original_type == "KeyError" and stand_in.__traceback__ is not None
        assert isinstance(stand_in.__context__, RedactedError)
        assert "OSError: during ***" in "".join(traceback.format_exception(error))
    # a cycle ends
    first, second = ValueError("first"), ValueError(f"second {ROUTE_KEY}")
    first.__context__, second.__context__ = second, first
    safe = redacted(first)
    assert isinstance(safe, RedactedError) and ROUTE_KEY not in "".join(
        traceback.format_exception(safe)
    )
    assert redacted(clean) is clean and redacted(None) is None
    # the setter sets the link
    error = UnavailableError("x")
    error.__cause__ = clean
    assert error.__cause__ is clean


def test_log_records_of_any_logger_are_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    Secret(ROUTE_KEY)
    caplog.set_level(logging.DEBUG)
    quoted = quote(ROUTE_KEY, safe="")
    logging.getLogger("httpcore.http11").debug("headers %r", [(b"x-echo", ROUTE_KEY.encode())])
    logging.getLogger("some.app").info("url-encoded %s", quoted)
    try:
        raise RuntimeError(f"server said {ROUTE_KEY}")
    except RuntimeError:
        logging.getLogger("some.app").exception("failed")
    assert len(caplog.records) == 3
    assert ROUTE_KEY not in caplog.text and quoted not in caplog.text
    assert caplog.text.count("***") >= 3


def test_scrub_masks_every_form_of_a_registered_secret_and_nothing_else() -> None:
    from nimpipe.redaction import scrub, scrub_data

    Secret(ROUTE_KEY)
    encoded = ROUTE_KEY.encode()
    forms = [
        ROUTE_KEY,
        quote(ROUTE_KEY, safe=""),
        json.dumps({"k": ROUTE_KEY}),
        base64.b64encode(encoded).decode(),
        base64.b64encode(b"user:" + encoded).decode(),
        base64.urlsafe_b64encode(b"ab" + encoded + b"cd").decode(),
        f"Authorization: Bearer {GUARD_KEY}",
        f"HTTP 401: bad key {ROUTE_KEY[:20]}; set $KEY",  # cut short after 20 characters
        f"...{ROUTE_KEY[-14:]} was refused",  # cut short before the last 14
        f"Basic {base64.b64encode(b'u:p4ss-w0rd').decode()}",
    ]
    for text in forms:
        assert scrub(text) != text and "***" in scrub(text), text
        assert not any(needle in scrub(text) for needle in NEEDLES.values()), text
    prose = "A basic understanding of bearer bonds, and an x."
    assert scrub(prose) == prose
    Secret("x")  # too short to mask without masking every x
    assert scrub(prose) == prose
    body = {"error": {"message": ROUTE_KEY, "ok": [1, 2]}}
    assert scrub_data(body) == {"error": {"message": "***", "ok": [1, 2]}}
    untouched = {"a": [1, "b"]}
    assert scrub_data(untouched) is untouched
    deep: Any = "leaf"
    for _ in range(10_000):
        deep = [deep]
    deep = scrub_data(deep)
    for _ in range(64):
        deep = deep[0]
    assert deep == "<nested too deep>", "a hostile nesting is cut, not followed to the end"


def test_a_quoted_reply_is_scrubbed_before_it_is_cut() -> None:
    from nimpipe_contrib.guardrails.backends.base import excerpt

    key = "nvapi" + "-" + secrets.token_hex(20)  # key-shaped, not registered
    text = "x" * 190 + " " + key  # a cut at 200 would leave a piece no pattern matches
    assert excerpt(text) == "x" * 190 + " ***"
    assert excerpt({"error": key}, 20) == "{'error': '***'}"
