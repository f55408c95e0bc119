"""Configuration: file discovery, validation errors, environment, secrets."""

from __future__ import annotations

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
