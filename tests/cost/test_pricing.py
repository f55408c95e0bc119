"""Price profiles: the bundled snapshot, the user's price file, amortised GPU cost, estimates."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import attrs
import pytest

import nimpipe
from nimpipe import Price, Route, Turn
from nimpipe.errors import ConfigError
from nimpipe.testing.nim_server import NimServer
from nimpipe_contrib.cost import prices as pricing

HOSTED_MODEL = "meta/llama-3.1-70b-instruct"


def hosted(base_url: str = "https://integrate.api.nvidia.com/v1", **kw: Any) -> Route:
    return Route(name="hosted", base_url=base_url, model=HOSTED_MODEL, **kw)


def local(base_url: str = "http://127.0.0.1:8000/v1", **kw: Any) -> Route:
    kw.setdefault("model", "meta/llama-3.1-8b-instruct")
    return Route(name="local", base_url=base_url, self_hosted=True, **kw)


def test_bundled_snapshot_is_versioned_and_every_price_has_a_source() -> None:
    path = Path(nimpipe.__file__).parent / "data" / pricing.SNAPSHOT_FILE
    raw = json.loads(path.read_text())
    assert raw["version"] and raw["currency"] == "USD"
    for model, entry in raw["models"].items():
        assert entry["source"], model
        assert entry["input_per_1k"] >= 0 and entry["output_per_1k"] >= 0
    snapshot = pricing.load_snapshot()
    price = snapshot.lookup("META/Llama-3.1-70B-Instruct")
    assert price is not None and price.input_per_1k == raw["models"][HOSTED_MODEL]["input_per_1k"]
    assert price.source.startswith(f"bundled snapshot {raw['version']}: indicative")


def test_a_snapshot_entry_without_source_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "prices.json"
    bad.write_text(json.dumps({"version": "x", "models": {"m": {"input_per_1k": 1.0}}}))
    with pytest.raises(ConfigError, match=r"models\.m\.source"):
        pricing.load_snapshot(bad)


def test_amortised_price_from_tokens_per_second() -> None:
    price = pricing.amortised_price(
        gpu_hour_usd=2.0, gpus=2, tokens_per_second=1000, utilization=0.5
    )
    # $4 per hour over 1.8M tokens served per hour
    assert price.input_per_1k == pytest.approx(4.0 / 1_800_000 * 1000)
    assert price.output_per_1k == price.input_per_1k
    assert "amortised: $2/GPU-h x 2 GPU / (1000 tok/s x 50% busy)" in price.source


def test_amortised_price_from_requests_per_hour() -> None:
    price = pricing.amortised_price(gpu_hour_usd=3.0, requests_per_hour=600, tokens_per_request=500)
    assert price.input_per_1k == pytest.approx(3.0 / 300_000 * 1000)
    with pytest.raises(ValueError, match="tokens_per_second, or requests_per_hour"):
        pricing.amortised_price(gpu_hour_usd=3.0, requests_per_hour=600)
    with pytest.raises(ValueError, match="utilization"):
        pricing.amortised_price(gpu_hour_usd=3.0, tokens_per_second=10, utilization=0)


def write_prices(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    return path


def test_price_file_and_precedence(tmp_path: Path) -> None:
    path = write_prices(
        tmp_path,
        'version = "acme-2025"\n'
        f'[models."{HOSTED_MODEL}"]\ninput_per_1k = 0.5\noutput_per_1k = 0.75\n'
        'source = "ACME contract"\n'
        "[routes.local]\ngpu_hour_usd = 3.6\ntokens_per_second = 1000\n"
        "[routes.special]\ninput_per_1k = 9.0\noutput_per_1k = 9.0\n",
    )
    book = pricing.PriceBook.load(path)
    # the price file's model entry beats the bundled snapshot
    price = book.price_for(hosted())
    assert price == Price(
        input_per_1k=0.5, output_per_1k=0.75, source=f"price file {path} (acme-2025): ACME contract"
    )
    # a route entry beats a model entry
    special = Route(name="special", base_url="https://x.example/v1", model=HOSTED_MODEL)
    assert book.price_for(special).input_per_1k == 9.0  # type: ignore[union-attr]
    # a self-hosted route with a GPU-hour cost is amortised: $3.6/h over 3.6M tok/h
    amortised = book.price_for(local())
    assert amortised is not None and amortised.input_per_1k == pytest.approx(0.001)
    assert "amortised" in amortised.source
    # the route's own price in nimpipe.toml beats everything
    own = Price(input_per_1k=1.0, output_per_1k=2.0, source="config")
    assert book.price_for(hosted(price=own)) is own


def test_self_hosted_is_free_and_unknown_hosted_models_are_unpriced() -> None:
    book = pricing.PriceBook.load()
    free = book.price_for(local())
    assert free is not None and free.input_per_1k == free.output_per_1k == 0.0
    assert free.source == pricing.SELF_HOSTED_FREE
    # a self-hosted route never takes a hosted price from the snapshot
    assert book.price_for(local(model=HOSTED_MODEL)) == free
    mystery = Route(name="x", base_url="https://x.example/v1", model="acme/unknown-model")
    assert book.price_for(mystery) is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[models.m]\ninput_per_1k = -1\n", "models.m.input_per_1k"),
        ("[models.m]\nprice = 1\n", "models.m.price"),
        ("[routes.r]\ninput_per_1k = 1\ngpu_hour_usd = 2\n", "routes.r"),
        ("[routes.r]\ntokens_per_second = 10\n", "routes.r.gpu_hour_usd"),
        ("[routes.r]\ngpu_hour_usd = 2\n", "routes.r"),
        ("currency = 'EUR'\n", "currency"),
    ],
)
def test_bad_price_files_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write_prices(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        pricing.load_overrides(path)
    assert info.value.key == key
    assert str(path) in str(info.value)


def test_pipeline_prices_its_routes_and_records_cost(make_pipeline: Any, tmp_path: Path) -> None:
    prices = write_prices(
        tmp_path, f'[models."{HOSTED_MODEL}"]\ninput_per_1k = 1.0\noutput_per_1k = 2.0\n'
    )
    with NimServer(model=HOSTED_MODEL) as server:
        pipeline = make_pipeline(
            routes=[hosted(server.base_url, self_hosted=False)],
            stages={"ledger": {"path": str(tmp_path / "l.sqlite"), "prices": str(prices)}},
        )
        route = pipeline.config.routes["hosted"]
        assert route.price is not None and route.price.source.startswith("price file")
        result = pipeline.run(Turn.create("price this call"))
    (record,) = result.records
    assert record.price_source == route.price.source
    assert record.cost_usd == pytest.approx(
        (record.prompt_tokens * 1.0 + record.completion_tokens * 2.0) / 1000
    )


def test_cost_stages_share_one_price_file(make_pipeline: Any, tmp_path: Path) -> None:
    one = write_prices(tmp_path, "")
    other = tmp_path / "other.toml"
    other.write_text("")
    with pytest.raises(ConfigError) as info:
        make_pipeline(
            routes=[hosted()],
            stages={
                "ledger": {"path": str(tmp_path / "l.sqlite"), "prices": str(one)},
                "budget": {"prices": str(other)},
            },
        )
    cause = info.value
    assert isinstance(cause, ConfigError)
    assert cause.key in ("stages.budget.prices", "stages.ledger.prices")


def test_missing_price_file_is_a_config_error(
    make_pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIMPIPE_PRICES", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError) as info:
        make_pipeline(routes=[hosted()], stages={"router": {}})
    assert isinstance(info.value, ConfigError)
    assert info.value.key == "NIMPIPE_PRICES"


def test_user_price_file_in_config_home(
    make_pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "xdg"
    (home / "nimpipe").mkdir(parents=True)
    (home / "nimpipe" / "prices.toml").write_text(
        f'[models."{HOSTED_MODEL}"]\ninput_per_1k = 0.25\noutput_per_1k = 0.25\n'
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    pipeline = make_pipeline(routes=[hosted()], stages={"router": {}})
    price = pipeline.config.routes["hosted"].price
    assert price is not None and price.input_per_1k == 0.25
    assert "prices.toml" in price.source


def test_unpriced_route_is_named_in_a_warning(
    make_pipeline: Any, caplog: pytest.LogCaptureFixture
) -> None:
    route = Route(name="mystery", base_url="https://x.example/v1", model="acme/mystery-1")
    with caplog.at_level(logging.WARNING, logger="nimpipe.pricing"):
        pipeline = make_pipeline(routes=[route], stages={"router": {}})
    assert pipeline.config.routes["mystery"].price is None
    assert "route 'mystery' (model 'acme/mystery-1') has no price" in caplog.text


def test_estimates_use_max_tokens_and_margin() -> None:
    route = hosted(price=Price(input_per_1k=1.0, output_per_1k=2.0))
    turn = Turn.create("count these few words please", params={"max_tokens": 10})
    estimate = pricing.estimate_call(turn, route, prompt_margin=1.5)
    prompt = pricing.estimate_prompt_tokens(turn, route.model)
    assert estimate.capped and estimate.completion_tokens == 10
    assert estimate.prompt_tokens == -(-prompt * 3 // 2)
    assert estimate.usd == pytest.approx((estimate.prompt_tokens * 1.0 + 10 * 2.0) / 1000)
    loose = pricing.estimate_call(Turn.create("x"), route, default_completion=100)
    assert not loose.capped and loose.completion_tokens == 100
    capped_route = pricing.estimate_call(Turn.create("x"), hosted(max_output_tokens=7))
    assert capped_route.capped and capped_route.completion_tokens == 7 and not capped_route.priced


@pytest.mark.parametrize(
    "text",
    [
        "plain English words",
        "naïve café déjà vu — “quotes”",
        "日本語のテキストと中文文本",
        "emoji 🎉🚀 and symbols ∑∫√",
        "x" * 5000,
        "def f(x):\n    return {'a': [1, 2, 3]}\n" * 50,
    ],
)
def test_the_byte_bound_is_never_below_the_tokenizer_count(text: str) -> None:
    from nimpipe import Message, ToolSpec

    turn = Turn.create(
        [Message.system("be brief"), Message.user(text)],
        tools=[ToolSpec(name="search", parameters={"type": "object", "properties": {}})],
    )
    counted = pricing.estimate_prompt_tokens(turn, "gpt-4o")
    counted_cl100k = pricing.estimate_prompt_tokens(turn, HOSTED_MODEL)
    assert pricing.prompt_token_bound(turn) >= max(counted, counted_cl100k)
    bound = pricing.estimate_call(turn, hosted(price=Price(input_per_1k=1.0)), bound=True)
    assert bound.bound and bound.prompt_tokens == pricing.prompt_token_bound(turn)


# ----------------------------------------------------------------------
# impossible prices are refused where they are loaded
# ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "-0.001"])
@pytest.mark.parametrize("name", ["input_per_1k", "output_per_1k"])
def test_a_price_file_with_an_impossible_price_names_it(
    tmp_path: Path, value: str, name: str
) -> None:
    path = write_prices(tmp_path, f'[models."{HOSTED_MODEL}"]\n{name} = {value}\n')
    with pytest.raises(ConfigError) as info:
        pricing.load_overrides(path)
    assert info.value.key == f"models.{HOSTED_MODEL}.{name}"
    assert "finite number >= 0" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("name", ["gpu_hour_usd", "tokens_per_second", "utilization"])
def test_an_amortised_price_with_an_infinite_figure_names_it(tmp_path: Path, name: str) -> None:
    figures = {"gpu_hour_usd": "2.0", "tokens_per_second": "100", "utilization": "0.5"}
    figures[name] = "inf"
    text = "[routes.local]\n" + "".join(f"{k} = {v}\n" for k, v in figures.items())
    with pytest.raises(ConfigError) as info:
        pricing.load_overrides(write_prices(tmp_path, text))
    assert info.value.key == f"routes.local.{name}"
    with pytest.raises(ValueError, match=name):
        pricing.amortised_price(**{k: float(v) for k, v in figures.items()})


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999", "-1"])
def test_a_snapshot_with_an_impossible_price_names_it(tmp_path: Path, raw: str) -> None:
    bad = tmp_path / "prices.json"
    bad.write_text(
        '{"version": "x", "models": {"m": {"input_per_1k": 0.1, "output_per_1k": '
        + raw
        + ', "source": "s"}}}'
    )
    with pytest.raises(ConfigError) as info:
        pricing.load_snapshot(bad)
    assert info.value.key == "models.m.output_per_1k"


@pytest.mark.parametrize("stage", ["ledger", "budget", "router", "cascade"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_a_route_with_an_impossible_price_is_refused_by_every_cost_stage(
    make_pipeline: Any, tmp_path: Path, stage: str, value: float
) -> None:
    settings: dict[str, Any] = {"path": str(tmp_path / "l.sqlite")} if stage == "ledger" else {}
    route = hosted(price=Price(input_per_1k=value, output_per_1k=0.001))
    with pytest.raises(ConfigError) as info:
        make_pipeline(routes=[route], stages={stage: settings})
    assert info.value.key == "routes.hosted.price.input_per_1k"
    assert pricing.price_problem(route.price) == f"input_per_1k is {value!r}"
    assert pricing.price_problem(Price(input_per_1k=0.5)) is None


def test_the_completion_cap_is_read_where_the_request_gets_it() -> None:
    route = hosted(extra_body={"max_completion_tokens": 300, "top_k": 5})
    turn = Turn.create("x")
    assert pricing.completion_limit(turn, route) == 300
    # the route's own cap is sent as max_tokens beside it: the larger counts
    assert pricing.completion_limit(turn, attrs.evolve(route, max_output_tokens=20)) == 300
    assert (
        pricing.completion_limit(Turn.create("x", params={"max_completion_tokens": 9}), route) == 9
    )
    assert pricing.completion_limit(turn, hosted()) is None
    # a value that is not a whole number > 0 caps nothing, and makes the cap unreadable
    for odd in ("lots", 0, 12.5, True, -3):
        odd_turn = Turn.create("x", params={"max_tokens": odd})
        assert pricing.completion_limit(odd_turn, hosted()) is None
        assert pricing.unreadable_cap(odd_turn, hosted(max_output_tokens=16))
        assert not pricing.estimate_call(odd_turn, hosted(max_output_tokens=16)).capped
    assert not pricing.unreadable_cap(turn, route)


def test_the_byte_bound_counts_lone_surrogates_instead_of_failing() -> None:
    turn = Turn.create("bad \ud800 input")
    assert pricing.prompt_token_bound(turn) >= len("bad  input") + 3
