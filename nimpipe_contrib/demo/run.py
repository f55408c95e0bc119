"""``nimpipe demo``: the whole pipeline and its stages, live on the embedded local model.

Live (default): builds the embedded llama.cpp server on first run and starts
it on 127.0.0.1 beside a NIM-shaped server that plays a NIM container still
loading its model.  In offline mode, it then shows the catalog, the wait for
readiness, guardrails blocking an input and an output, a cascade escalation,
a fan-out batch, the ledger's cost table and what offline mode allowed and
refused.

``--replay`` answers the same requests from the recorded cassette: no server,
no network, a few seconds.  ``--record`` re-records that cassette live, on
the fixed ports the cassette names.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nimpipe.types import FinishReason, Route, Turn

#: Where the demo cassette was recorded (``--record`` serves the servers here).
LLAMA_PORT = 18080
NIM_PORT = 18081
LLAMA_URL = f"http://127.0.0.1:{LLAMA_PORT}/v1"
NIM_URL = f"http://127.0.0.1:{NIM_PORT}/v1"
NIM_MODEL = "meta/llama-3.1-8b-instruct"
#: Seconds the NIM-shaped server spends "loading its model".
NIM_LOADING = 3.0
#: Request settings that make the small model's answers short and repeatable.
PARAMS = {"temperature": 0.0, "seed": 7}
#: Characters of a fan-out answer shown on its line.
ANSWER_WIDTH = 70


def default_cassette(*, recording: bool = False) -> Path:
    """The demo cassette: ``cassettes/demo.yaml`` of a checkout, else the packaged copy.

    Recording always writes ``cassettes/demo.yaml`` under the working directory.
    """
    local = Path.cwd() / "cassettes" / "demo.yaml"
    if recording or local.is_file():
        return local
    import nimpipe

    return Path(nimpipe.__file__).parent / "data" / "demo.yaml"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _title(text: str) -> None:
    _say(f"\n== {text} ==")


@contextlib.contextmanager
def _servers(record: bool) -> Iterator[tuple[str, str]]:
    from nimpipe.embedded import EmbeddedModel
    from nimpipe.testing.nim_server import NimServer

    model = EmbeddedModel()
    if not model.is_installed():
        _title("building the embedded model server (first run only)")
    model.ensure_installed()
    started = time.perf_counter()
    _title("starting llama.cpp with SmolLM2-135M on 127.0.0.1")
    with model.start(port=LLAMA_PORT if record else 0) as llama:
        _say(
            f"   ready at {llama.base_url} in {time.perf_counter() - started:.1f} s "
            f"(pid {llama.pid})"
        )
        container = NimServer(
            port=NIM_PORT if record else 0,
            models=[{"id": NIM_MODEL, "max_model_len": 131072}],
            ready_after=NIM_LOADING,
        )
        with container:
            _say(
                f"   a NIM-shaped server at {container.base_url} plays a NIM container "
                f"that loads its model for {NIM_LOADING:.0f} s"
            )
            yield llama.base_url, container.base_url
    _say(f"\n   stopped llama.cpp (pid {llama.pid}) and the NIM-shaped server")


@contextlib.contextmanager
def _cassette(path: Path, mode: str) -> Iterator[None]:
    from nimpipe.cassettes import replaying

    try:
        import vcr  # noqa: F401
    except ImportError:
        raise SystemExit(
            "nimpipe demo --replay needs vcrpy: pip install 'nimpipe[testing]'"
        ) from None
    with replaying(path, mode):
        yield


def run_demo(*, replay: bool = False, record: bool = False, cassette: str | None = None) -> int:
    """Run the demo; returns the exit code."""
    path = Path(cassette) if cassette else default_cassette(recording=record)
    if replay and record:
        raise SystemExit("nimpipe demo: choose --replay or --record, not both")
    with contextlib.ExitStack() as stack:
        if replay:
            if not path.is_file():
                raise SystemExit(f"nimpipe demo: no cassette at {path} (record one with --record)")
            _title(f"replaying {path} (no server, no network)")
            llama_url, nim_url = LLAMA_URL, NIM_URL
        else:
            llama_url, nim_url = stack.enter_context(_servers(record))
        if record:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nimpipe-demo-")))
        from nimpipe import offline

        offline.reset_stats()
        try:
            with contextlib.ExitStack() as recording:
                if replay or record:
                    recording.enter_context(_cassette(path, "all" if record else "none"))
                _catalog_and_readiness(llama_url, nim_url, tmp, replay=replay)
                _guarded_cascade_fanout_cost(llama_url, tmp)
            _offline_report()
        finally:
            offline.disable()
        if record:
            _say(f"\n== recorded {path} ==")
    return 0


def _catalog_and_readiness(llama_url: str, nim_url: str, tmp: Path, *, replay: bool) -> None:
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.nim.monitor import wait_until_ready
    from nimpipe_contrib.nim.reports import models_report

    local = Route(name="local", base_url=llama_url, model="smollm2", self_hosted=True)
    container = Route(name="container", base_url=nim_url, model=NIM_MODEL, self_hosted=True)
    stages = {
        "nim_catalog": {"cache_dir": str(tmp / "catalog")},
        # The demo probes by hand so that a replay sends the recorded requests.
        "nim_health": {"probe": "none"},
    }
    config = Config.from_dict({"offline": True, "stages": stages}, env={}).with_routes(
        local, container, default="local"
    )
    with Pipeline.create(config, entrypoints=False) as pipeline:
        _title("offline mode: on (only loopback and self-hosted routes)")
        _title("stages")
        for info in pipeline.plugins.info():
            _say(f"   {info.name:<16} {info.kind:<8} {', '.join(info.hooks)}")

        _title("waiting for the NIM container (nim_health)")
        snapshot = wait_until_ready(
            container,
            timeout=60,
            progress=_Changes(lambda line: _say(f"   {line}")),
            interval=0.01 if replay else 0.5,
            # At most one line a second of real waiting (a replay waits for none).
            progress_every=1.0,
        )
        _say(f"   {container.base_url}: {snapshot.state.value}")

        _title("catalog: every endpoint's /v1/models (nim_catalog)")
        catalog: Any = pipeline.plugins.pm.get_plugin("nim_catalog")
        infos = catalog.models(refresh=True)
        table, problems = models_report(infos, catalog.endpoint_catalogs(), capabilities=False)
        for line in [*table, *problems]:
            _say(f"   {line}")
        for route in catalog.apply_contexts():
            _say(f"   route {route.name}: context {route.context_length} ({route.context_source})")


def _guarded_cascade_fanout_cost(llama_url: str, tmp: Path) -> None:
    from nimpipe.config import Config
    from nimpipe.errors import NimpipeError
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Price
    from nimpipe_contrib.cost.reports import format_report

    short = Route(
        name="local-short",
        base_url=llama_url,
        model="smollm2",
        self_hosted=True,
        tier=0,
        max_output_tokens=6,
    )
    full = Route(
        name="local-full",
        base_url=llama_url,
        model="smollm2",
        self_hosted=True,
        tier=1,
        max_output_tokens=48,
        # Priced like a hosted tier, to show what escalation costs.
        price=Price(input_per_1k=0.0005, output_per_1k=0.0015, source="demo"),
    )
    stages = {
        "guardrails": {"backends": [], "input_mode": "sequential"},
        "pii_redactor": {"action": "block"},
        "cascade": {},
        "ledger": {"path": str(tmp / "ledger.sqlite")},
    }
    config = Config.from_dict({"offline": True, "stages": stages}, env={}).with_routes(
        short, full, default="local-short"
    )
    with Pipeline.create(config, entrypoints=False) as pipeline:
        _title("stages of the agent pipeline")
        for info in pipeline.plugins.info():
            _say(f"   {info.name:<22} {info.kind:<8} {', '.join(info.hooks)}")
        turns = [
            ("guardrails: a blocked input", "My card is 4111 1111 1111 1111, is it still valid?"),
            (
                "guardrails: a blocked output",
                "The support phone number is one eight hundred, five five five, "
                "nine seven three two. Write it with digits.",
            ),
            ("cascade: the short tier truncates, so the turn escalates", "Why is the sky blue?"),
        ]
        for number, (title, prompt) in enumerate(turns, 1):
            _title(title)
            _say(f"   user: {prompt}")
            result = pipeline.run(
                Turn.create(prompt, params=PARAMS, timeout=120, id=f"demo-{number}")
            )
            for decision in result.decisions:
                kind = type(decision).__name__.lower()
                _say(f"   - {decision.plugin}: {kind}: {getattr(decision, 'reason', '')}")
            for verdict in result.verdicts:
                _say(f"   - verdict {verdict.rule}: {verdict.decision} ({verdict.plugin})")
            route = result.route.name if result.route else "-"
            answer = shown(result.text, cut=result.finish_reason is FinishReason.LENGTH)
            _say(f"   answer ({route}, {len(result.records)} model calls): {answer}")

        _title("fan-out: 6 subagent turns, 3 at a time")
        prompts = [
            f"Name a {thing}." for thing in ("fruit", "colour", "planet", "river", "tree", "bird")
        ]
        batch = [
            Turn.create(
                p,
                params=PARAMS,
                timeout=120,
                agent_id=f"sub-{i}",
                agent_type="worker",
                id=f"fan-{i}",
            )
            for i, p in enumerate(prompts)
        ]
        started = time.perf_counter()
        results = pipeline.map(batch, concurrency=3, progress=_progress)
        for prompt, outcome in zip(prompts, results, strict=True):
            if isinstance(outcome, NimpipeError):
                text = shown(f"error: {outcome}", width=ANSWER_WIDTH)
            else:
                cut = outcome.finish_reason is FinishReason.LENGTH
                text = shown(outcome.text, cut=cut, width=ANSWER_WIDTH)
            _say(f"   {prompt:<16} -> {text}")
        _say(f"   {len(batch)} turns in {time.perf_counter() - started:.1f} s")

        ledger_stage: Any = pipeline.plugins.pm.get_plugin("ledger")
        ledger = ledger_stage.ledger
        ledger.flush()
        _title("cost table (ledger stage, by route)")
        for line in format_report(ledger.report("route"), "route").splitlines():
            _say(f"   {line}")
        _title("cost table (by agent)")
        for line in format_report(ledger.report("agent"), "agent").splitlines():
            _say(f"   {line}")


def shown(text: str, *, cut: bool = False, width: int | None = None) -> str:
    """``text`` on one line, ending in ``…`` where it was cut.

    ``cut`` says the model was stopped mid-answer (``max_tokens``): its last
    word may be a fragment, so the text goes back to its last whole sentence,
    else drops its last word.  ``width`` caps the length, cutting between words.
    """
    line = " ".join(text.split())
    if cut:
        line = _whole_sentences(line) or _without_last_word(line)
    if width is not None and len(line) + 2 * cut > width:
        line, cut = _within(line, width - 2), True
    if not cut:
        return line
    return f"{line} …" if line.endswith((".", "!", "?")) else f"{line}…"


def _whole_sentences(line: str) -> str:
    ends = [i for i, char in enumerate(line) if char in ".!?" and line[i + 1 : i + 2] in ("", " ")]
    return line[: ends[-1] + 1] if ends else ""


def _without_last_word(line: str) -> str:
    head, space, _ = line.rpartition(" ")
    return head.rstrip(" ,;:") if space else line


def _within(line: str, width: int) -> str:
    head = line[: width + 1]  # one more: a space there means the cut falls between words
    space = head.rfind(" ")
    return (head[:space] if space > 0 else line[:width]).rstrip(" ,;:")


class _Changes:
    """A progress callback that passes a line on only when it differs from the last one."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self._last: str | None = None

    def __call__(self, line: str) -> None:
        if line != self._last:
            self._last = line
            self._say(line)


def _progress(done: int, total: int) -> None:
    sys.stdout.write(f"\r   [{'#' * done}{'.' * (total - done)}] {done}/{total}")
    if done == total:
        sys.stdout.write("\n")
    sys.stdout.flush()


def _offline_report() -> None:
    import socket

    from nimpipe import offline
    from nimpipe.errors import OfflineError

    _title("offline mode: what the process reached")
    try:
        socket.create_connection(("integrate.api.nvidia.com", 443), timeout=5).close()
    except OfflineError as exc:
        _say(f"   refused: {exc}")
    counts: dict[str, Any] = offline.stats()
    for key, value in sorted(counts.items()):
        _say(f"   {key}: {value}")
    foreign = [k for k in counts if k.startswith("allowed:") and not k.startswith("allowed:127.")]
    _say(f"   connections to anything but loopback: {len(foreign)}")
