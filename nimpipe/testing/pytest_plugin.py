"""pytest plugin (entry point ``pytest11``): replay nimpipe model calls from cassettes.

Use in any test suite where nimpipe is installed::

    @pytest.mark.nimpipe_cassette("chat-hello")
    def test_hello(nimpipe_cassette, make_pipeline):
        pipeline = make_pipeline(routes=[Route(name="local", base_url=..., model="smollm2")])
        assert pipeline.run(Turn.create("hello")).text

Cassettes are replay-only by default: a request that is not in the cassette
fails at once instead of reaching the network.  ``--nimpipe-record`` records
new interactions (``--nimpipe-record=all`` re-records whole cassettes).
Requests are matched on method, URL and body, so a different prompt never gets
a recorded answer.  Nothing secret is written: credential headers are dropped,
and every registered key and everything key-shaped is masked in URLs, headers
and bodies of requests and responses (a server may echo the key it got; see
:mod:`nimpipe.cassettes`).

Ini option ``nimpipe_cassette_dir`` sets where cassettes live (default
``cassettes`` beside the rootdir).  Needs ``vcrpy`` (``pip install
nimpipe[testing]``); nothing is imported until a test asks for a fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nimpipe.cassettes import vcr_settings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nimpipe")
    group.addoption(
        "--nimpipe-record",
        action="store",
        nargs="?",
        const="new_episodes",
        default="none",
        choices=("none", "new_episodes", "all", "once"),
        help="record nimpipe cassettes (default: replay only)",
    )
    parser.addini("nimpipe_cassette_dir", "directory of nimpipe cassettes", default="cassettes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nimpipe_cassette(name): replay model calls from the named nimpipe cassette"
    )


@pytest.fixture
def nimpipe_vcr_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """vcrpy settings for nimpipe cassettes (usable as pytest-recording's ``vcr_config``)."""
    root = Path(str(request.config.rootpath))
    directory = root / request.config.getini("nimpipe_cassette_dir")
    return vcr_settings(directory, request.config.getoption("--nimpipe-record"))


@pytest.fixture
def nimpipe_cassette(
    request: pytest.FixtureRequest, nimpipe_vcr_config: dict[str, Any]
) -> Iterator[Any]:
    """Activate the cassette named by ``@pytest.mark.nimpipe_cassette(name)`` (or the test name)."""
    try:
        import vcr
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.fail("nimpipe cassettes need vcrpy: pip install 'nimpipe[testing]'")
    marker = request.node.get_closest_marker("nimpipe_cassette")
    name = marker.args[0] if marker and marker.args else request.node.name
    settings = dict(nimpipe_vcr_config)
    directory = settings.pop("cassette_library_dir")
    recorder = vcr.VCR(**settings)
    with recorder.use_cassette(f"{directory}/{name}.yaml", allow_playback_repeats=True) as cassette:
        yield cassette


@pytest.fixture
def make_pipeline() -> Iterator[Callable[..., Any]]:
    """Factory for isolated pipelines: no entry-point plugins, config from arguments only.

    ``make_pipeline(routes=[...], plugins=[...], **config)`` returns a
    :class:`nimpipe.Pipeline`; every pipeline made is closed after the test.
    """
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline

    made: list[Pipeline] = []

    def make(
        routes: Any = (), plugins: Any = (), default_route: str | None = None, **settings: Any
    ) -> Pipeline:
        config = Config.from_dict(settings, env={})
        routes = tuple(routes)
        config = config.with_routes(
            *routes, default=default_route or (routes[0].name if routes else None)
        )
        pipeline = Pipeline.create(config, plugins=plugins, entrypoints=False)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


@pytest.fixture
def nim_server() -> Iterator[Any]:
    """A NIM-shaped test server on 127.0.0.1 (see :mod:`nimpipe.testing.nim_server`)."""
    from nimpipe.testing.nim_server import NimServer

    with NimServer() as server:
        yield server
