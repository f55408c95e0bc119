"""Configuration: file discovery, validation errors, environment, secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nimpipe.config import HOSTED_NIM_URL, Config, find_config_file
from nimpipe.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_routes_from_file(tmp_path: Path) -> None:
    file = write(
        tmp_path / "nimpipe.toml",
        """
default_route = "local"
max_attempts = 3
[routes.local]
base_url = "http://127.0.0.1:8000/v1/"
model = "meta/llama-3.1-8b-instruct"
context_length = 8192
[routes.hosted]
base_url = "https://integrate.api.nvidia.com/v1"
model = "meta/llama-3.1-70b-instruct"
tier = 1
price = { input_per_1k = 0.001, output_per_1k = 0.002 }
""",
    )
    config = Config.load(file, env={"NVIDIA_API_KEY": "nvapi-secret"})
    local, hosted = config.routes["local"], config.routes["hosted"]
    assert local.base_url == "http://127.0.0.1:8000/v1"
    assert local.self_hosted and local.context_length == 8192 and local.context_source == "config"
    assert not hosted.self_hosted and hosted.tier == 1
    assert hosted.api_key is not None and hosted.api_key.reveal() == "nvapi-secret"
    assert hosted.api_key_env == "NVIDIA_API_KEY"
    assert hosted.price is not None and hosted.price.cost(1000, 1000) == pytest.approx(0.003)
    assert config.default_route == "local" and config.max_attempts == 3
    assert "nvapi-secret" not in repr(config)
    assert "nvapi-secret" not in str(config.masked())


def test_search_order(tmp_path: Path) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    named = write(tmp_path / "named.toml", "")
    user_dir = tmp_path / "xdg" / "nimpipe"
    user_dir.mkdir(parents=True)
    user = write(user_dir / "nimpipe.toml", "")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert find_config_file(env, cwd) == user
    assert find_config_file({**env, "NIMPIPE_CONFIG": str(named)}, cwd) == named
    local = write(cwd / "nimpipe.toml", "")
    assert find_config_file({**env, "NIMPIPE_CONFIG": str(named)}, cwd) == local


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        find_config_file({"NIMPIPE_CONFIG": str(tmp_path / "nope.toml")}, tmp_path)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[routes.a]\nmodel = 'm'\n", "routes.a.base_url", "is required"),
        ("[routes.a]\nbase_url = 'ftp://x'\nmodel = 'm'\n", "routes.a.base_url", "http"),
        (
            "[routes.a]\nbase_url = 'http://x/v1'\nmodel = 'm'\ntier = 'high'\n",
            "routes.a.tier",
            "integer",
        ),
        (
            "[routes.a]\nbase_url = 'http://x/v1'\nmodel = 'm'\nspeed = 1\n",
            "routes.a.speed",
            "unknown",
        ),
        (
            "[routes.a]\nbase_url = 'http://x/v1'\nmodel = 'm'\napi_key = 'abc'\n",
            "routes.a.api_key",
            "api_key_env",
        ),
        ("[stages.x]\ntoken = 'nvapi-123'\n", "stages.x.token", "never written"),
        ("colour = 'red'\n", "colour", "unknown setting"),
        ("stream_policy = 'drip'\n", "stream_policy", "buffer, sentence"),
        ("default_route = 'ghost'\n", "default_route", "names no configured route"),
        ("max_attempts = 0\n", "max_attempts", "at least 1"),
    ],
)
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    file = write(tmp_path / "nimpipe.toml", text)
    with pytest.raises(ConfigError) as info:
        Config.load(file, env={})
    assert info.value.path == str(file)
    assert info.value.key == key
    assert problem in str(info.value)
    assert str(file) in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    file = write(tmp_path / "nimpipe.toml", "[routes\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(file, env={})


def test_jaato_settings_alone_make_a_route() -> None:
    env = {
        "JAATO_NIM_API_KEY": "nvapi-k",
        "JAATO_NIM_MODEL": "meta/llama-3.1-8b-instruct",
        "JAATO_NIM_CONTEXT_LENGTH": "16384",
    }
    config = Config.from_dict({}, env=env)
    nim = config.routes["nim"]
    assert nim.base_url == HOSTED_NIM_URL
    assert nim.model == "meta/llama-3.1-8b-instruct"
    assert nim.context_length == 16384 and nim.context_source == "environment"
    assert nim.api_key is not None and nim.api_key.reveal() == "nvapi-k"
    assert not nim.self_hosted


def test_jaato_self_hosted_url() -> None:
    env = {"JAATO_NIM_BASE_URL": "http://172.20.0.5:8000/v1", "JAATO_NIM_MODEL": "m"}
    assert Config.from_dict({}, env=env).routes["nim"].self_hosted


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({}, env={"NIMPIPE_MAX_ATTEMPTS": "lots"})
    assert info.value.key == "NIMPIPE_MAX_ATTEMPTS" and info.value.path == "environment"
    with pytest.raises(ConfigError, match="JAATO_NIM_MODEL"):
        Config.from_dict({}, env={"JAATO_NIM_BASE_URL": "http://127.0.0.1:8000/v1"})


def test_env_overrides_file() -> None:
    data = {
        "routes": {"a": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}},
        "stream_policy": "buffer",
    }
    env = {
        "NIMPIPE_ROUTE": "a",
        "NIMPIPE_STREAM_POLICY": "sentence",
        "NIMPIPE_OFFLINE": "1",
        "NIMPIPE_DISABLE_PLUGINS": "x, y",
        "NIMPIPE_LOAD_PLUGINS": "",
    }
    config = Config.from_dict(data, env=env)
    assert config.default_route == "a"
    assert config.stream_policy == "sentence"
    assert config.offline
    assert config.disable_plugins == ("x", "y")
    assert config.load_plugins == ()
    assert Config.from_dict({}, env={"JAATO_OFFLINE": "true"}).offline


def test_stage_tables_enable_stages() -> None:
    config = Config.from_dict({"stages": {"a": {"level": 2}, "b": {"enabled": False}}}, env={})
    assert config.stages == ("a",)
    assert config.stage("a") == {"level": 2}
    assert config.stage("b") == {}
    assert config.stage("zzz") == {}


def test_route_lookup_error_lists_routes() -> None:
    config = Config.from_dict(
        {"routes": {"a": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}}}, env={}
    )
    with pytest.raises(ConfigError, match="routes: a"):
        config.route("b")


def test_route_extra_body_from_config() -> None:
    data = {
        "routes": {
            "a": {
                "base_url": "http://127.0.0.1:1/v1",
                "model": "m",
                "extra_body": {"nvext": {"top_k": 5}},
            }
        }
    }
    assert Config.from_dict(data, env={}).routes["a"].extra_body == {"nvext": {"top_k": 5}}


def fake_key() -> str:
    """A key-shaped value, built at run time (the repository holds no key-shaped literal)."""
    return "nva" + "pi-" + "Q7rT" * 10


ROUTE = "[routes.a]\nbase_url = 'http://127.0.0.1:1/v1'\nmodel = 'm'\n"


def test_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "nimpipe.toml"
    file.write_bytes(b"# caf\xe9\nmax_attempts = 2\n")
    with pytest.raises(ConfigError) as info:
        Config.load(file, env={})
    assert info.value.path == str(file)
    assert "not UTF-8" in str(info.value) and "0xe9" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_dev_null_means_no_config_file(tmp_path: Path) -> None:
    write(tmp_path / "nimpipe.toml", "max_attempts = 2\n")
    user_dir = tmp_path / "xdg" / "nimpipe"
    user_dir.mkdir(parents=True)
    write(user_dir / "nimpipe.toml", "max_attempts = 3\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "NIMPIPE_CONFIG": os.devnull}
    assert find_config_file(env, tmp_path) is None
    config = Config.load(env=env, cwd=tmp_path)
    assert config.source is None and config.max_attempts == 4
    assert Config.load(os.devnull, env={}).source is None


@pytest.mark.parametrize("how", ["env", "path"])
def test_directory_or_device_is_a_clear_error(tmp_path: Path, how: str) -> None:
    for target, problem in ((tmp_path, "is a directory"), (Path("/dev/zero"), "not a regular")):
        with pytest.raises(ConfigError) as info:
            if how == "env":
                find_config_file({"NIMPIPE_CONFIG": str(target)}, tmp_path / "elsewhere")
            else:
                Config.load(target, env={})
        assert problem in str(info.value) and info.value.path == str(target)
        assert info.value.key == ("NIMPIPE_CONFIG" if how == "env" else None)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (ROUTE + "timeout = nan\n", "routes.a.timeout"),
        (ROUTE + "timeout = inf\n", "routes.a.timeout"),
        (ROUTE + "connect_timeout = -inf\n", "routes.a.connect_timeout"),
        (ROUTE + "price = { input_per_1k = nan }\n", "routes.a.price.input_per_1k"),
        (ROUTE + "price = { output_per_1k = inf }\n", "routes.a.price.output_per_1k"),
        (ROUTE + "max_retries = 100000000000000000000\n", "routes.a.max_retries"),
        ("max_retry_wait = inf\n", "max_retry_wait"),
    ],
)
def test_numbers_must_be_finite_and_bounded(tmp_path: Path, text: str, key: str) -> None:
    file = write(tmp_path / "nimpipe.toml", text)
    with pytest.raises(ConfigError) as info:
        Config.load(file, env={})
    assert info.value.key == key and info.value.path == str(file)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_environment_numbers_must_be_finite(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({}, env={"NIMPIPE_MAX_RETRY_WAIT": value})
    assert info.value.key == "NIMPIPE_MAX_RETRY_WAIT" and info.value.path == "environment"


def test_stage_settings_refuse_nan_and_inf() -> None:
    from nimpipe_contrib._settings import StageSettings

    for value in (float("nan"), float("inf"), "nan"):
        settings = StageSettings("s", {"x": value, "xs": [1.0, value]}, "f.toml", "stages.s")
        with pytest.raises(ConfigError) as info:
            settings.number("x")
        assert info.value.key == "stages.s.x"
        with pytest.raises(ConfigError) as info:
            settings.numbers("xs")
        assert info.value.key == "stages.s.xs[1]"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NIMPIPE_STREAM_POLICY": "drip"}, "NIMPIPE_STREAM_POLICY"),
        ({"NIMPIPE_ROUTE": "ghost"}, "NIMPIPE_ROUTE"),
        ({"NIMPIPE_TRACE": "perhaps"}, "NIMPIPE_TRACE"),
        ({"NIMPIPE_LOAD_PLUGINS": "5"}, None),  # a name list: any string is fine
        ({"NIMPIPE_BASE_URL": "http://[::1/v1", "NIMPIPE_MODEL": "m"}, "NIMPIPE_BASE_URL"),
        (
            {
                "NIMPIPE_CONTEXT_LENGTH": "0",
                "NIMPIPE_MODEL": "m",
                "NIMPIPE_BASE_URL": "http://127.0.0.1:1/v1",
            },
            "NIMPIPE_CONTEXT_LENGTH",
        ),
    ],
)
def test_every_environment_error_names_the_variable(
    env: dict[str, str], variable: str | None
) -> None:
    data = {
        "stream_policy": "buffer",
        "routes": {"a": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}},
        "default_route": "a",
    }
    if variable is None:
        Config.from_dict(data, env=env)
        return
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data, env=env, source="nimpipe.toml")
    assert info.value.key == variable and info.value.path == "environment"


def test_file_errors_still_name_the_file_key() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"stream_policy": "drip"}, env={}, source="nimpipe.toml")
    assert (info.value.key, info.value.path) == ("stream_policy", "nimpipe.toml")
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"default_route": "ghost"}, env={}, source="nimpipe.toml")
    assert (info.value.key, info.value.path) == ("default_route", "nimpipe.toml")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("flags = ['fast', '{key}']", "routes.a.flags[1]"),
        ("flags = ['{key}', 5]", "routes.a.flags[0]"),
        ("headers = {{ X-Extra = '{key}' }}", "routes.a.headers.X-Extra"),
        ("headers = {{ X-Extra = 'Bearer abc.def-123456789' }}", "routes.a.headers.X-Extra"),
        ("headers = {{ X-Api-Key = 'short' }}", "routes.a.headers.X-Api-Key"),
        (
            "extra_body = {{ nvext = {{ hints = [['{key}']] }} }}",
            "routes.a.extra_body.nvext.hints[0][0]",
        ),
        ("extra_body = {{ '{key}' = 1 }}", "routes.a.extra_body.***"),
        ("price = {{ input_per_1k = '{key}' }}", "routes.a.price.input_per_1k"),
    ],
)
def test_keys_anywhere_are_refused_naming_the_path_not_the_value(extra: str, key: str) -> None:
    import tomllib

    secret = fake_key()
    data = tomllib.loads(ROUTE + extra.format(key=secret) + "\n")
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data, env={}, source="nimpipe.toml")
    assert info.value.key == key, str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret[6:20] not in str(info.value)


def test_stage_list_with_a_key_is_refused() -> None:
    secret = fake_key()
    data = {"stages": {"guardrails": {"denied_tools": ["shell", secret]}}}
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data, env={})
    assert info.value.key == "stages.guardrails.denied_tools[1]"
    assert secret not in str(info.value)


def test_error_messages_never_echo_a_key() -> None:
    """Wherever a reader shows a bad value, a key in it is masked (here from the environment,
    which the file check does not see)."""
    secret = fake_key()
    for env in (
        {"NIMPIPE_BASE_URL": secret, "NIMPIPE_MODEL": "m"},
        {"NIMPIPE_MAX_ATTEMPTS": secret},
        {"NIMPIPE_OFFLINE": secret},
        {"NIMPIPE_STREAM_POLICY": secret},
        {"NIMPIPE_ROUTE": secret},
    ):
        with pytest.raises(ConfigError) as info:
            Config.from_dict({}, env=env)
        assert secret not in str(info.value), env
        assert secret[6:20] not in str(info.value), env


def test_url_with_a_password_is_refused() -> None:
    data = {
        "routes": {"a": {"base_url": "http://user:hunter2hunter2@127.0.0.1:1/v1", "model": "m"}}
    }
    with pytest.raises(ConfigError, match="password") as info:
        Config.from_dict(data, env={})
    assert info.value.key == "routes.a.base_url" and "hunter2" not in str(info.value)


def test_nesting_is_bounded() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(200):
        node["n"] = {}
        node = node["n"]  # type: ignore[assignment]
    data = {
        "routes": {"a": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "extra_body": deep}}
    }
    with pytest.raises(ConfigError, match="nested more than"):
        Config.from_dict(data, env={})


def test_deeply_nested_toml_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "nimpipe.toml"
    file.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError) as info:
        Config.load(file, env={})
    assert info.value.path == str(file)
