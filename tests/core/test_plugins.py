"""Plugin discovery, selection, listing, tracing and plugin-declared hooks."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from nimpipe import Route, Turn, hookimpl, hookspec
from nimpipe.config import Config
from nimpipe.errors import PluginLoadError
from nimpipe.pipeline import Pipeline
from nimpipe.plugins import CONTRIB_STAGES


def install_dist(
    root: Path, name: str, version: str, module_source: str, eps: dict[str, str]
) -> None:
    """Write a real installed distribution (module + dist-info with entry points) under ``root``."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{ep} = {target}" for ep, target in eps.items())
    (info / "entry_points.txt").write_text(f"[nimpipe]\n{lines}\n")


MODEL = "meta/llama-3.1-8b-instruct"

PLUGIN_SOURCE = """
from nimpipe import hookimpl

CALLS = []

@hookimpl
def pre_input(turn):
    CALLS.append(turn.id)
"""

BROKEN_SOURCE = "raise RuntimeError('cannot import me')\n"


@pytest.fixture
def dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    install_dist(tmp_path, "np_alpha", "1.2.3", PLUGIN_SOURCE, {"alpha": "np_alpha"})
    install_dist(tmp_path, "np_beta", "0.4.0", PLUGIN_SOURCE, {"beta": "np_beta"})
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def config(**settings: Any) -> Config:
    return Config.from_dict(settings, env={})


def test_entry_points_load_with_versions_and_hooks(dists: Path) -> None:
    with Pipeline.create(config(), entrypoints=True) as pipeline:
        infos = {i.name: i for i in pipeline.plugins.info()}
    assert infos["alpha"].version == "1.2.3" and infos["alpha"].kind == "entrypoint"
    assert infos["alpha"].hooks == ("pre_input",)
    assert infos["beta"].version == "0.4.0"
    assert infos["default_route"].kind == "builtin"
    assert infos["default_route"].hooks == ("select_provider",)


def test_load_plugins_selects_and_disable_blocks(dists: Path) -> None:
    with Pipeline.create(config(plugins={"load": ["alpha"]})) as pipeline:
        names = {i.name for i in pipeline.plugins.info()}
    assert "alpha" in names and "beta" not in names
    with Pipeline.create(config(plugins={"disable": ["alpha"]})) as pipeline:
        names = {i.name for i in pipeline.plugins.info()}
    assert "alpha" not in names and "beta" in names
    with Pipeline.create(config(plugins={"load": []})) as pipeline:
        names = {i.name for i in pipeline.plugins.info()}
    assert names == {"default_route"}


def test_unknown_plugin_name_is_an_error(dists: Path) -> None:
    with pytest.raises(PluginLoadError, match="not installed: ghost"):
        Pipeline.create(config(plugins={"load": ["ghost"]}))


def test_broken_entry_point_names_the_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_dist(tmp_path, "np_broken", "0.1", BROKEN_SOURCE, {"broken": "np_broken"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError) as info:
        Pipeline.create(config(plugins={"load": ["broken"]}))
    assert info.value.plugin == "broken"
    assert "cannot import me" in str(info.value)


def test_disabling_a_builtin(nim_server: Any) -> None:
    route = Route(name="r", base_url=nim_server.base_url, model="meta/llama-3.1-8b-instruct")
    cfg = config(plugins={"disable": ["default_route"]}).with_routes(route, default="r")
    with Pipeline.create(cfg, entrypoints=False) as pipeline:
        assert "default_route" not in {i.name for i in pipeline.plugins.info()}
        from nimpipe.errors import NoRouteError

        with pytest.raises(NoRouteError):
            pipeline.run(Turn.create("x"))


def test_unknown_contrib_stage_is_a_config_error() -> None:
    from nimpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        Pipeline.create(config(stages={"nonexistent": {}}), entrypoints=False)


def test_implementing_an_undeclared_hook_is_refused() -> None:
    class Typo:
        @hookimpl
        def pre_inptu(self) -> None:
            return None

    with pytest.raises(PluginLoadError, match="pre_inptu"):
        Pipeline.create(config(), plugins=[Typo()], entrypoints=False)


# ----------------------------------------------------------------------
# plugin-declared hooks (the addhooks pattern)
# ----------------------------------------------------------------------


class AuditSpecs:
    @hookspec
    def audit_event(self, kind: str, detail: str) -> str | None:
        """Called by the auditor plugin for every turn; returns a label."""

    @hookspec(firstresult=True)
    def audit_level(self) -> int | None:
        """First result wins."""


class Auditor:
    """Declares ``audit_event`` and calls it from ``pre_input``."""

    def __init__(self) -> None:
        self.labels: list[Any] = []

    @hookimpl
    def addhooks(self, pluginmanager: Any) -> None:
        pluginmanager.add_hookspecs(AuditSpecs)

    @hookimpl
    def pre_input(self, turn: Turn, pipeline: Pipeline) -> None:
        self.labels.append(pipeline.hooks.call("audit_event", kind="turn", detail=turn.id))
        self.labels.append(pipeline.hooks.call("audit_level"))


class Tagger:
    @hookimpl
    def audit_event(self, kind: str) -> str:
        return f"tagged {kind}"

    @hookimpl
    def audit_level(self) -> int:
        return 3


class AsyncTagger:
    @hookimpl
    async def audit_event(self, detail: str) -> str:
        return f"async {detail[:2]}"


def test_plugins_declare_hooks_that_others_implement(nim_server: Any, make_pipeline: Any) -> None:
    auditor = Auditor()
    # Implementations registered before the declaring plugin are accepted too.
    pipeline = make_pipeline(
        routes=[Route(name="r", base_url=nim_server.base_url, model="meta/llama-3.1-8b-instruct")],
        plugins=[Tagger(), AsyncTagger(), auditor],
    )
    pipeline.run(Turn.create("hello", id="t-audit"))
    assert auditor.labels == [["async t-", "tagged turn"], 3]


def test_trace_logs_every_hook_call(nim_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    route = Route(name="r", base_url=nim_server.base_url, model="meta/llama-3.1-8b-instruct")
    cfg = Config.from_dict({}, env={"NIMPIPE_TRACE": "1"}).with_routes(route, default="r")
    caplog.set_level("INFO", logger="nimpipe.trace")
    with Pipeline.create(cfg, entrypoints=False) as pipeline:
        pipeline.run(Turn.create("x"))
    messages = [r.getMessage() for r in caplog.records if r.name == "nimpipe.trace"]
    assert any(m.startswith("hook select_provider -> default_route: Route (") for m in messages)


def test_trace_without_logging_goes_to_stderr(nim_server: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "trace.py"
    script.write_text(
        "from nimpipe import Pipeline, Route, Turn\n"
        "from nimpipe.config import Config\n"
        f"route = Route(name='r', base_url={nim_server.base_url!r}, model={MODEL!r})\n"
        "cfg = Config.from_dict({}, env={'NIMPIPE_TRACE': '1'}).with_routes(route, default='r')\n"
        "Pipeline.create(cfg, entrypoints=False).run(Turn.create('x'))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "[nimpipe] hook select_provider -> default_route: Route" in done.stderr


class Lifecycle:
    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        self.events.append(f"configure {pipeline.config.stage('lifecycle').get('level')}")

    @hookimpl
    async def unconfigure(self) -> None:
        self.events.append("unconfigure")


def test_configure_and_unconfigure_run_once() -> None:
    stage = Lifecycle()
    cfg = Config.from_dict({"stages": {"lifecycle": {"level": 2, "enabled": False}}}, env={})
    pipeline = Pipeline.create(cfg, plugins=[stage], entrypoints=False)
    assert stage.events == ["configure 2"]
    pipeline.close()
    pipeline.close()
    assert stage.events == ["configure 2", "unconfigure"]
    from nimpipe.errors import NimpipeError

    with pytest.raises(NimpipeError, match="closed"):
        pipeline.run(Turn.create("x"))


# ----------------------------------------------------------------------
# stage settings: config errors reach the caller as config errors
# ----------------------------------------------------------------------


class StrictStage:
    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        from nimpipe_contrib._settings import StageSettings

        StageSettings.of(pipeline, "strict").number("level")


def test_config_error_in_configure_is_not_wrapped() -> None:
    from nimpipe.errors import ConfigError, HookError

    cfg = Config.from_dict({"stages": {"strict": {"level": "high", "enabled": False}}}, env={})
    with pytest.raises(ConfigError) as info:
        Pipeline.create(cfg, plugins=[("strict", StrictStage())], entrypoints=False)
    assert not isinstance(info.value, HookError)
    assert info.value.key == "stages.strict.level"
    with pytest.raises(ConfigError) as info:
        Pipeline.create(config(stages={"budget": {"daily_usd": "lots"}}), entrypoints=False)
    assert info.value.key == "stages.budget.daily_usd"


def test_every_contrib_stage_has_a_settings_reader() -> None:
    from nimpipe_contrib._settings import SETTINGS_READERS

    assert set(SETTINGS_READERS) == set(CONTRIB_STAGES)


#: Settings each stage needs to read an otherwise empty table (guardrails needs a backend).
_MINIMAL: dict[str, dict[str, Any]] = {"guardrails": {"backends": []}}


@pytest.mark.parametrize("name", sorted(CONTRIB_STAGES))
def test_check_stages_reads_each_table_as_the_stage_does(name: str, tmp_path: Path) -> None:
    """An unknown key in any contrib stage's table is an error naming it; a good table passes,
    and checking starts nothing (no thread, no file)."""
    import threading

    from nimpipe.errors import ConfigError
    from nimpipe.plugins import check_stages

    good: dict[str, Any] = dict(_MINIMAL.get(name, {}))
    if name == "ledger":
        good["path"] = str(tmp_path / "ledger.sqlite")
    threads = threading.active_count()
    check_stages(config(stages={name: good}))
    assert threading.active_count() == threads
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError) as info:
        check_stages(config(stages={name: {**good, "no_such_setting": 1}}))
    assert info.value.key == f"stages.{name}.no_such_setting"


def test_check_stages_names_where_an_unknown_stage_came_from() -> None:
    from nimpipe.errors import ConfigError
    from nimpipe.plugins import check_stages

    with pytest.raises(ConfigError, match="known: budget") as info:
        check_stages(Config.from_dict({"stages": {"ghost": {}}}, env={}, source="n.toml"))
    assert (info.value.key, info.value.path) == ("stages.ghost", "n.toml")
    with pytest.raises(ConfigError, match="'ghost'") as info:
        check_stages(Config.from_dict({}, env={"NIMPIPE_STAGES": "cascade,ghost"}))
    assert (info.value.key, info.value.path) == ("NIMPIPE_STAGES", "environment")
    # A disabled table's settings are not read, but its name must be a stage.
    check_stages(config(stages={"guardrails": {"enabled": False}}))
    with pytest.raises(ConfigError):
        check_stages(config(stages={"ghost": {"enabled": False}}))


def test_statuses_list_entry_points_that_could_be_loaded(dists: Path) -> None:
    from nimpipe.plugins import plugin_statuses

    cfg = config(plugins={"load": ["alpha"], "disable": ["default_route"]})
    with Pipeline.create(cfg) as pipeline:
        statuses = {s.name: s for s in plugin_statuses(pipeline.config, pipeline.plugins)}
    assert statuses["alpha"].active and statuses["alpha"].version == "1.2.3"
    assert statuses["alpha"].hooks == ("pre_input",)
    assert not statuses["beta"].active and statuses["beta"].kind == "entrypoint"
    assert "NIMPIPE_LOAD_PLUGINS=beta" in statuses["beta"].how
    assert not statuses["default_route"].active
    assert "NIMPIPE_DISABLE_PLUGINS" in statuses["default_route"].how
    assert not statuses["ledger"].active and "NIMPIPE_STAGES=ledger" in statuses["ledger"].how


# --------------------------------------------------------------------------
# The core names contrib only in its tables
# --------------------------------------------------------------------------


def test_core_plugin_modules_name_contrib_only_in_tables() -> None:
    import ast

    import nimpipe

    core = Path(nimpipe.__file__).parent
    for module in ("plugins.py", "settings.py", "cli.py"):
        tree = ast.parse((core / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("nimpipe_contrib"), (module, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("nimpipe_contrib"), (module, alias.name)


def test_builtin_command_modules_implement_register_commands() -> None:
    import importlib

    from nimpipe.plugins import BUILTIN_COMMANDS

    assert set(BUILTIN_COMMANDS.values()) == {
        "nimpipe_contrib.nim.commands",
        "nimpipe_contrib.cost.commands",
        "nimpipe_contrib.demo",
    }
    for module_path in BUILTIN_COMMANDS.values():
        assert callable(importlib.import_module(module_path).register_commands)


def test_every_contrib_stage_has_a_settings_reader_and_the_core_calls_it(
    tmp_path: Path,
) -> None:
    import importlib

    from nimpipe.errors import ConfigError
    from nimpipe.plugins import CONTRIB_SETTINGS_READERS
    from nimpipe.settings import check_stage_settings

    readers = importlib.import_module(CONTRIB_SETTINGS_READERS).SETTINGS_READERS
    assert set(readers) == set(CONTRIB_STAGES)
    path = tmp_path / "nimpipe.toml"
    path.write_text("[stages.cascade]\nno_such_key = 1\n")
    config = Config.load(str(path))
    with pytest.raises(ConfigError, match=r"stages\.cascade\.no_such_key"):
        check_stage_settings(config, "cascade")
    seen: list[str] = []
    check_stage_settings(config, "mine", {"mine": lambda c: seen.append(c.source or "")})
    assert seen == [str(path)]
    check_stage_settings(config, "unknown_stage", {})  # no reader: nothing to check
