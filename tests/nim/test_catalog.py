"""The ``nim_catalog`` stage against real NIM-shaped servers: discovery, context, cache, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.nim import MODEL, route, wait_for

from nimpipe import Route, Turn, hookimpl
from nimpipe.cli import main as cli_main
from nimpipe.config import Config
from nimpipe.errors import ConfigError
from nimpipe.jaato import _reports
from nimpipe.pipeline import Pipeline
from nimpipe.testing.nim_server import NimServer, closed_port_url
from nimpipe_contrib.nim.catalog import NimCatalog
from nimpipe_contrib.nim.catalog_settings import DEFAULT_CONTEXT_LENGTH, CatalogSettings
from nimpipe_contrib.nim.health_settings import HealthSettings
from nimpipe_contrib.nim.known_models import load_overrides, load_snapshot

HOSTED_MODEL = "meta/llama-3.1-70b-instruct"
UNKNOWN_MODEL = "acme/unknown-model"


def catalog_of(pipeline: Pipeline) -> NimCatalog:
    plugin = pipeline.plugins.pm.get_plugin("nim_catalog")
    assert isinstance(plugin, NimCatalog)
    return plugin


def hosted_like(server: Any, *ids: str) -> None:
    """Make ``/v1/models`` answer as the hosted catalog does: no ``max_model_len``."""
    data = [{"id": i, "object": "model", "created": 0, "owned_by": i.split("/")[0]} for i in ids]
    server.inject(
        "status", count=None, path="/v1/models", status=200, body={"object": "list", "data": data}
    )


def settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"nim_catalog": {"cache_dir": str(tmp_path / "cache"), **extra}}


def test_a_self_hosted_route_gets_its_context_from_max_model_len(
    make_pipeline: Any, tmp_path: Path
) -> None:
    with NimServer(max_model_len=65536) as server:
        pipeline = make_pipeline(routes=[route("local", server)], stages=settings(tmp_path))
        wait_for(lambda: pipeline.config.route("local").context_length == 65536, "context")
        local = pipeline.config.route("local")
        assert local.context_source == "server"
        assert catalog_of(pipeline).context_length(local) == (65536, "server")
        assert pipeline.run(Turn.create("hello", timeout=30)).ok


def test_models_lists_what_every_endpoint_serves(make_pipeline: Any, tmp_path: Path) -> None:
    lora = {"id": "acme/support-lora", "parent": MODEL, "root": MODEL, "owned_by": "acme"}
    with NimServer(models=[MODEL, lora], max_model_len=32768) as local, NimServer() as other:
        hosted_like(other, HOSTED_MODEL, UNKNOWN_MODEL)
        pipeline = make_pipeline(
            routes=[route("local", local), route("hosted", other, HOSTED_MODEL)],
            stages=settings(tmp_path),
        )
        infos = catalog_of(pipeline).models()
    by_id = {info.id: info for info in infos}
    assert list(by_id) == [MODEL, "acme/support-lora", HOSTED_MODEL, UNKNOWN_MODEL]
    base = by_id[MODEL]
    assert (base.routes, base.owned_by, base.root, base.parent) == (
        ("local",),
        "system",
        MODEL,
        None,
    )
    assert (base.max_model_len, base.context_length, base.context_source) == (
        32768,
        32768,
        "server",
    )
    adapter = by_id["acme/support-lora"]
    assert adapter.parent == MODEL and adapter.owned_by == "acme" and adapter.routes == ()
    assert adapter.capabilities == ("chat", "tools", "lora")  # the base model's, plus lora
    hosted = by_id[HOSTED_MODEL]
    assert hosted.max_model_len is None and hosted.routes == ("hosted",)
    assert (hosted.context_length, hosted.context_source) == (131072, "snapshot")
    unknown = by_id[UNKNOWN_MODEL]
    assert (unknown.context_length, unknown.context_source) == (DEFAULT_CONTEXT_LENGTH, "default")


def test_sources_config_then_override_then_server_then_snapshot(
    make_pipeline: Any, tmp_path: Path
) -> None:
    overrides = tmp_path / "models.toml"
    overrides.write_text(
        f'[models."{UNKNOWN_MODEL}"]\ncontext_length = 16384\nnote = "our deployment"\n'
        f'[models."other/capped"]\ncontext_length = 2048\n'
        "price = { input_per_1k = 0.001, output_per_1k = 0.002 }\n"
    )
    with (
        NimServer(models=[MODEL, "other/capped"], max_model_len=131072) as local,
        NimServer() as other,
    ):
        hosted_like(other, HOSTED_MODEL, UNKNOWN_MODEL, "acme/nothing-known")
        routes = [
            route("configured", local, context_length=4096, context_source="config"),
            route("capped", local, "other/capped"),
            route("server", local, MODEL),
            route("snapshot", other, HOSTED_MODEL),
            route("override", other, UNKNOWN_MODEL),
            route("default", other, "acme/nothing-known"),
        ]
        pipeline = make_pipeline(routes=routes, stages=settings(tmp_path, overrides=str(overrides)))
        catalog = catalog_of(pipeline)
        catalog.refresh()
        got = {r.name: (r.context_length, r.context_source) for r in pipeline.routes}
        assert got == {
            "configured": (4096, "config"),
            "capped": (2048, "override"),
            "server": (131072, "server"),
            "snapshot": (131072, "snapshot"),
            "override": (16384, "override"),
            "default": (None, "unknown"),  # left alone: nothing knows it
        }
        assert catalog.context_length(pipeline.config.route("default")) == (32768, "default")
        capped = next(i for i in catalog.cached_models() if i.id == "other/capped")
        assert capped.price is not None and capped.price.source == "override"
        assert catalog.known(UNKNOWN_MODEL).note == "our deployment"  # type: ignore[union-attr]


def test_the_catalog_survives_a_restart_offline(make_pipeline: Any, tmp_path: Path) -> None:
    with NimServer(max_model_len=65536) as server:
        first = make_pipeline(routes=[route("local", server)], stages=settings(tmp_path))
        wait_for(lambda: first.config.route("local").context_length == 65536, "discovery")
        first.close()
        url = server.base_url
    assert list((tmp_path / "cache").glob("*.json"))

    # The server is gone: a new pipeline knows the context at once, from the disk cache.
    second = make_pipeline(
        routes=[Route(name="local", base_url=url, model=MODEL)], stages=settings(tmp_path)
    )
    assert second.config.route("local").context_length == 65536
    catalog = catalog_of(second)
    infos = catalog.models(refresh=True)
    assert [(i.id, i.origin, i.context_source) for i in infos] == [(MODEL, "disk", "server")]
    (entry,) = catalog.endpoint_catalogs()
    assert entry.error == f"connection refused at {url}/models"


def test_a_fresh_catalog_is_not_fetched_again(make_pipeline: Any, tmp_path: Path) -> None:
    with NimServer() as server:
        pipeline = make_pipeline(routes=[route("local", server)], stages=settings(tmp_path))
        catalog = catalog_of(pipeline)
        wait_for(lambda: server.count("/v1/models") == 1, "discovery")
        wait_for(lambda: catalog.catalog(server.base_url) is not None, "stored")
        catalog.models()
        catalog.models(search="llama")
        assert server.count("/v1/models") == 1
        catalog.models(refresh=True)
        assert server.count("/v1/models") == 2

        stale = make_pipeline(
            routes=[route("local", server)],
            stages=settings(tmp_path, ttl=0, refresh_on_start=False),
        )
        catalog_of(stale).models()
        catalog_of(stale).models()
        assert server.count("/v1/models") == 4


def test_a_model_without_a_route_is_found_where_it_is_served(
    make_pipeline: Any, tmp_path: Path
) -> None:
    with NimServer() as first, NimServer(models=["other/model", "third/model"]) as second:
        pipeline = make_pipeline(
            routes=[route("a", first), route("b", second, "other/model")],
            stages=settings(tmp_path),
        )
        catalog = catalog_of(pipeline)
        wait_for(lambda: catalog.catalog(second.base_url) is not None, "discovery")
        for _ in range(2):
            result = pipeline.run(Turn.create("hello", model="third/model", timeout=30))
            assert result.route is not None and result.route.name == "third/model@b"
        assert (
            second.count("/v1/chat/completions") == 2 and first.count("/v1/chat/completions") == 0
        )
        assert [r.body["model"] for r in second.requests if r.path.endswith("completions")] == [
            "third/model",
            "third/model",
        ]
        added = pipeline.config.route("third/model@b")
        assert added.base_url == second.base_url and added.context_source == "server"
        # Nothing serves this one: the turn goes to the default route as before.
        assert catalog.route_for("no/such-model") is None


class Refuse:
    """A third-party stage that knows some routes cannot take a call now."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.asked: list[str] = []

    @hookimpl
    def route_usable(self, route: Route) -> bool | None:
        self.asked.append(route.name)
        return False if route.name in self.names else None


class Agree:
    @hookimpl
    def route_usable(self) -> bool:
        return True


def test_a_route_some_stage_calls_unusable_is_not_chosen_for_a_model(
    make_pipeline: Any, tmp_path: Path
) -> None:
    with (
        NimServer(models=["shared/model", MODEL]) as first,
        NimServer(models=["shared/model", "other/model"]) as second,
    ):
        refuse = Refuse("a")
        pipeline = make_pipeline(
            routes=[route("a", first), route("b", second, "other/model")],
            stages=settings(tmp_path),
            plugins=[("refuse", refuse), ("agree", Agree())],
        )
        catalog = catalog_of(pipeline)
        wait_for(lambda: catalog.catalog(first.base_url) is not None, "discovery of a")
        wait_for(lambda: catalog.catalog(second.base_url) is not None, "discovery of b")
        first_route, second_route = pipeline.config.route("a"), pipeline.config.route("b")
        assert catalog.usable is not None
        assert not catalog.usable(first_route) and catalog.usable(second_route)
        result = pipeline.run(Turn.create("hello", model="shared/model", timeout=30))
        assert result.route is not None and result.route.name == "shared/model@b"
        assert "a" in refuse.asked
        assert first.count("/v1/chat/completions") == 0
        assert second.count("/v1/chat/completions") == 1
        # Another stage's True does not outvote a False: refusing b now steers to a.
        refuse.names = {"b"}
        assert catalog.usable(first_route) and not catalog.usable(second_route)
        steered = catalog.route_for("shared/model")
        assert steered is not None and steered.name == "shared/model@a"


def test_malformed_model_lists_are_clear_errors_not_crashes(
    make_pipeline: Any, tmp_path: Path
) -> None:
    with NimServer() as server:
        server.inject("malformed", count=None, path="/v1/models")
        pipeline = make_pipeline(
            routes=[route("local", server)], stages=settings(tmp_path, refresh_on_start=False)
        )
        catalog = catalog_of(pipeline)
        assert catalog.models() == []
        (entry,) = catalog.endpoint_catalogs()
        assert entry.error is not None
        assert entry.error.startswith(f"malformed reply from {server.base_url}/models: not JSON")
        server.clear_faults()
        server.inject("status", count=None, path="/v1/models", status=401)
        catalog.refresh(force=True)
        (entry,) = catalog.endpoint_catalogs()
        assert "HTTP 401" in (entry.error or "") and "API key" in (entry.error or "")
        assert pipeline.run(Turn.create("still works", timeout=30)).ok


def test_health_probes_keep_the_catalog_fresh_at_no_extra_request(
    make_pipeline: Any, tmp_path: Path
) -> None:
    with NimServer(max_model_len=8192) as server:
        pipeline = make_pipeline(
            routes=[route("local", server)],
            stages={
                **settings(tmp_path, refresh_on_start=False),
                "nim_health": {"interval": 0.1, "timeout": 1},
            },
        )
        wait_for(lambda: pipeline.config.route("local").context_length == 8192, "context")
        health = pipeline.plugins.pm.get_plugin("nim_health")
        probes = health.registry.snapshot(server.base_url).probes
        assert server.count("/v1/models") <= probes + 1
        assert catalog_of(pipeline).catalog(server.base_url).origin == "server"  # type: ignore[union-attr]


def test_jaato_list_models_and_nim_models_read_the_catalog(
    make_pipeline: Any, tmp_path: Path
) -> None:
    with NimServer(models=[MODEL, "other/model"]) as server:
        pipeline = make_pipeline(routes=[route("local", server)], stages=settings(tmp_path))
        rows = _reports.ask(pipeline, _reports.CATALOG_HOOK, search="LLAMA", capabilities=True)
    assert rows == [
        {
            "id": MODEL,
            "route": "local",
            "endpoint": server.base_url,
            "context_length": 131072,
            "context_source": "server",
            "parent": None,
            "capabilities": ["chat", "tools"],
        }
    ]


# --------------------------------------------------------------------------
# Settings, the snapshot and the override file
# --------------------------------------------------------------------------


def test_the_snapshot_is_versioned_and_says_where_figures_come_from() -> None:
    snapshot = load_snapshot()
    assert snapshot.version == "2026-11-01"
    assert len(snapshot.models) >= 10
    for known in snapshot.models.values():
        assert known.context_length and known.context_length >= 2048
        assert known.note and known.origin == "snapshot"
        assert known.price is None  # no public per-token price for the hosted catalog
    raw = json.loads(
        (Path(__file__).resolve().parents[2] / "nimpipe/data/nim_models.json").read_text()
    )
    assert set(raw) == {"version", "about", "models"}


def test_override_file_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models."m"]\ncontext_length = "big"\n')
    with pytest.raises(ConfigError) as info:
        load_overrides(path)
    assert str(path) in str(info.value) and "models.m.context_length" in str(info.value)
    path.write_text('[models."m"]\ncontext = 1\n')
    with pytest.raises(ConfigError, match=r"models\.m\.context"):
        load_overrides(path)
    path.write_text("[models\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_overrides(path)
    assert load_overrides(tmp_path / "absent.toml") == {}
    with pytest.raises(ConfigError, match="file not found"):
        load_overrides(tmp_path / "absent.toml", required=True)


def test_a_named_override_file_must_exist(make_pipeline: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        make_pipeline(
            routes=[Route(name="x", base_url=closed_port_url(), model=MODEL)],
            stages=settings(tmp_path, overrides=str(tmp_path / "nope.toml")),
        )
    assert "file not found" in str(info.value)


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"stages\.nim_catalog\.ttl"):
        CatalogSettings.from_table({"ttl": "soon"})
    with pytest.raises(ConfigError, match=r"stages\.nim_catalog\.tll"):
        CatalogSettings.from_table({"tll": 5})


def documented_settings(stage: str) -> dict[str, str]:
    """The settings table of ``[stages.STAGE]`` in docs/catalog-health.md: key -> default."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "catalog-health.md").read_text("utf-8")
    section = doc.split(f"`[stages.{stage}]`:", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    return {key.strip().strip("`"): default.strip().strip("`") for key, default in rows}


@pytest.mark.parametrize(
    ("stage", "kind"), [("nim_catalog", CatalogSettings), ("nim_health", HealthSettings)]
)
def test_documented_settings_are_the_settings_and_their_defaults(stage: str, kind: type) -> None:
    import attrs

    documented = documented_settings(stage)
    fields = {f.name: f.default for f in attrs.fields(kind) if f.name != "overrides_named"}
    assert set(documented) == set(fields)
    for key, default in fields.items():
        if default is None:
            continue  # shown as where it defaults to (a path)
        shown = documented[key]
        if isinstance(default, bool):
            assert shown == str(default).lower(), key
        elif isinstance(default, (int, float)):
            assert float(shown) == default, key
        else:
            assert shown == default, key
    assert kind.from_table({}) == kind()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# ``nimpipe models``
# --------------------------------------------------------------------------


def write_config(tmp_path: Path, routes: dict[str, tuple[str, str]]) -> str:
    lines = [f'[stages.nim_catalog]\ncache_dir = "{tmp_path / "cache"}"\n']
    for name, (url, model) in routes.items():
        lines.append(f'[routes.{name}]\nbase_url = "{url}"\nmodel = "{model}"\n')
    path = tmp_path / "nimpipe.toml"
    path.write_text("\n".join(lines))
    return str(path)


def test_nimpipe_models_table_search_capabilities_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = closed_port_url()
    with NimServer(models=[MODEL, "other/model"], max_model_len=65536) as server:
        config = write_config(tmp_path, {"local": (server.base_url, MODEL), "gone": (dead, MODEL)})
        assert cli_main(["--config", config, "models"]) == 0
        table = capsys.readouterr()
        assert cli_main(["--config", config, "models", "--search", "llama", "--capabilities"]) == 0
        searched = capsys.readouterr()
        assert cli_main(["--config", config, "models", "--json", "--refresh"]) == 0
        payload = json.loads(capsys.readouterr().out)
    lines = table.out.splitlines()
    assert lines[0].split() == ["model", "context", "source", "routes", "endpoint", "base", "model"]
    assert lines[1].split()[:5] == [MODEL, "65536", "server", "local", server.base_url]
    assert lines[2].split()[:4] == ["other/model", "65536", "server", "-"]
    assert f"nimpipe models: {dead}: connection refused at {dead}/models; nothing cached" in (
        table.err
    )
    assert "capabilities" in searched.out and "chat, tools" in searched.out
    assert "other/model" not in searched.out
    assert payload["snapshot_version"] == "2026-11-01"
    assert [m["id"] for m in payload["models"]] == [MODEL, "other/model"]
    assert payload["models"][0]["max_model_len"] == 65536
    assert {e["endpoint"]: e["error"] is None for e in payload["endpoints"]} == {
        server.base_url: True,
        dead: False,
    }


def test_nimpipe_models_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = closed_port_url()
    config = write_config(tmp_path, {"gone": (dead, MODEL)})
    assert cli_main(["--config", config, "models"]) == 1
    assert "connection refused" in capsys.readouterr().err
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert cli_main(["--config", str(empty), "models"]) == 2
    assert "no endpoint is configured" in capsys.readouterr().err


def test_offline_the_hosted_catalog_is_not_asked(tmp_path: Path) -> None:
    config = Config.from_dict(
        {
            "offline": True,
            "routes": {
                "hosted": {"base_url": "https://integrate.api.nvidia.com/v1", "model": MODEL}
            },
            "stages": settings(tmp_path),
        },
        env={},
    )
    catalog = NimCatalog.from_config(config)
    (entry,) = catalog.refresh()
    assert entry.skipped == "offline: not a local endpoint" and entry.error is None
