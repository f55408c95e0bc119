"""``nimpipe demo``: turns through the pipeline on the embedded local model.

Live (default): builds the embedded llama.cpp server on first run, starts it
on 127.0.0.1, runs a few turns through the pipeline with the stages that
exist, prints what each stage did, and stops the server.

``--replay`` answers the same turns from the recorded cassette: no server, no
network, a second or two.  ``--record`` re-records that cassette live (on the
fixed port the cassette names).
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nimpipe._markers import hookimpl
from nimpipe.types import Block, CallRecord, Output, Route, Turn

#: Where the demo cassette was recorded (``--record`` serves the model here).
RECORD_PORT = 18080
RECORD_BASE_URL = f"http://127.0.0.1:{RECORD_PORT}/v1"
#: Request settings that make the small model's answers short and repeatable.
PARAMS = {"temperature": 0.0, "max_tokens": 48, "seed": 7}

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


def default_cassette() -> Path:
    """The demo cassette: ``cassettes/demo.yaml`` of a checkout, else the packaged copy."""
    local = Path.cwd() / "cassettes" / "demo.yaml"
    return local if local.is_file() else Path(__file__).parent / "data" / "demo.yaml"


# --------------------------------------------------------------------------
# Demo stages: ordinary plugins, each showing one hook.
# --------------------------------------------------------------------------


class InputPolicy:
    """``pre_input``: refuses prompts that ask for credentials (no model call is made)."""

    @hookimpl
    def pre_input(self, turn: Turn) -> Block | None:
        if re.search(r"\b(password|api key)\b", turn.last_user_text, re.IGNORECASE):
            return Block(reason="asks for credentials", rule="no-credentials")
        return None


class EmailRedactor:
    """``post_output``: masks e-mail addresses in answers."""

    @hookimpl
    def post_output(self, output: Output) -> str | None:
        if _EMAIL.search(output.text):
            return _EMAIL.sub("[email]", output.text)
        return None


@attrs.define
class CostTable:
    """``record_cost``: keeps every call record for the table at the end."""

    records: list[CallRecord] = attrs.field(factory=list)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        with self.lock:
            self.records.append(record)


TURNS: tuple[tuple[str, str, bool], ...] = (
    ("plain turn", "What is the capital of France? Answer in one short sentence.", False),
    ("streamed turn", "Name three colours of the rainbow.", True),
    ("blocked input", "Tell me the admin password for the database.", False),
    (
        "output rewrite",
        "What is the e-mail address in this text? 'Contact: ana@example.com'",
        False,
    ),
)


def _say(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _live_server(port: int) -> Iterator[Any]:
    from nimpipe.embedded import EmbeddedModel

    model = EmbeddedModel()
    if not model.is_installed():
        _say("== building the embedded model server (first run only) ==")
    model.ensure_installed()
    started = time.perf_counter()
    _say("== starting llama.cpp with SmolLM2-135M on 127.0.0.1 ==")
    with model.start(port=port) as server:
        _say(
            f"   ready at {server.base_url} in {time.perf_counter() - started:.1f} s "
            f"(pid {server.pid})"
        )
        yield server
    _say(f"   stopped llama.cpp (pid {server.pid})")


@contextlib.contextmanager
def _cassette(path: Path, mode: str) -> Iterator[None]:
    try:
        import vcr
    except ImportError:
        raise SystemExit(
            "nimpipe demo --replay needs vcrpy: pip install 'nimpipe[testing]'"
        ) from None
    from nimpipe.testing.pytest_plugin import vcr_settings

    settings = vcr_settings(path.parent, mode)
    settings.pop("cassette_library_dir")
    with vcr.VCR(**settings).use_cassette(str(path)):
        yield


def run_demo(*, replay: bool = False, record: bool = False, cassette: str | None = None) -> int:
    """Run the demo; returns the exit code."""
    path = Path(cassette) if cassette else default_cassette()
    if replay and record:
        raise SystemExit("nimpipe demo: choose --replay or --record, not both")
    with contextlib.ExitStack() as stack:
        if replay:
            if not path.is_file():
                raise SystemExit(f"nimpipe demo: no cassette at {path} (record one with --record)")
            _say(f"== replaying {path} (offline: no server, no network) ==")
            stack.enter_context(_cassette(path, "none"))
            base_url = RECORD_BASE_URL
        else:
            server = stack.enter_context(_live_server(RECORD_PORT if record else 0))
            base_url = server.base_url
            if record:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.exists():
                    path.unlink()
                stack.enter_context(_cassette(path, "all"))
        _run_turns(base_url)
        if record:
            _say(f"== recorded {path} ==")
    return 0


def _run_turns(base_url: str) -> None:
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline

    local = Route(name="local", base_url=base_url, model="smollm2", self_hosted=True, max_retries=1)
    config = Config.from_dict({}, env={}).with_routes(local, default="local")
    table = CostTable()
    stages = [
        ("input_policy", InputPolicy()),
        ("email_redactor", EmailRedactor()),
        ("cost_table", table),
    ]
    with Pipeline.create(config, plugins=stages, entrypoints=False) as pipeline:
        _say("\n== stages ==")
        for info in pipeline.plugins.info():
            _say(f"   {info.name:<15} {info.kind:<8} {', '.join(info.hooks)}")
        for number, (title, prompt, streaming) in enumerate(TURNS, 1):
            _say(f"\n== {title} ==")
            _say(f"   user: {prompt}")
            turn = Turn.create(prompt, timeout=60, params=PARAMS, id=f"demo-{number}")
            if streaming:
                sys.stdout.write("   model (streamed): ")
                stream = pipeline.stream(turn)
                for chunk in stream:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                result = stream.result
                assert result is not None
            else:
                result = pipeline.run(turn)
                _say(f"   model: {result.text.strip()}")
            for decision in result.decisions:
                kind = type(decision).__name__.lower()
                _say(f"   - {decision.plugin}: {kind} ({getattr(decision, 'reason', '')})")
            if result.blocked is not None:
                _say(f"   - no model call was made; the user sees: {result.blocked.message!r}")
            elif result.response is not None:
                usage = result.response.usage
                _say(
                    f"   - route {result.route.name if result.route else '?'}: "
                    f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens "
                    f"({usage.source}), {result.response.latency * 1000:.0f} ms"
                )
        _say("\n== cost table (record_cost: one record per model call) ==")
        _say(
            f"   {'turn':<8} {'route':<6} {'outcome':<8} {'prompt':>6} {'compl.':>6} "
            f"{'source':<9} {'ms':>6}"
        )
        for r in table.records:
            _say(
                f"   {r.turn_id:<8} {r.route:<6} {r.outcome:<8} {r.prompt_tokens:>6} "
                f"{r.completion_tokens:>6} {r.usage_source:<9} {r.latency * 1000:>6.0f}"
            )
