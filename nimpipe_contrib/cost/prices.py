"""Price profiles: what a call on each route costs, and where each figure came from.

A route's price is USD per 1,000 input (prompt) and output (completion)
tokens, a :class:`~nimpipe.types.Price` whose ``source`` says where the figure
came from.  The first of these that applies prices a route:

1. the route's own ``price`` in ``nimpipe.toml`` (source ``config``);
2. the user's price file, ``[routes.NAME]`` then ``[models."MODEL"]``;
3. a self-hosted route: free (its GPUs are paid for anyway), unless the price
   file gives it an amortised GPU-hour cost;
4. the bundled snapshot (``nimpipe/data/nim_prices.json``, versioned), by
   model id, for hosted routes only;
5. otherwise the route is unpriced: its calls are recorded with cost 0 and
   ``price_source = "none"``, a warning names it, and the budget stage
   refuses it unless told otherwise.

The price file is TOML; its path is the ``prices`` setting of any cost stage
(``ledger``, ``budget``, ``router``, ``cascade``), else ``$NIMPIPE_PRICES``,
else ``~/.config/nimpipe/prices.toml`` (``$XDG_CONFIG_HOME``) when it exists::

    version = "acme-2025-06"              # optional label, shown in sources

    [models."meta/llama-3.1-70b-instruct"]
    input_per_1k = 0.0006
    output_per_1k = 0.0008
    source = "ACME enterprise agreement"  # optional

    [routes.local]                        # self-hosted: amortised GPU cost
    gpu_hour_usd = 2.50                   # per GPU
    gpus = 1
    tokens_per_second = 2400              # or requests_per_hour + tokens_per_request
    utilization = 0.5                     # share of paid hours spent serving

An amortised price is ``gpu_hour_usd * gpus`` divided by the tokens served
in that hour (``tokens_per_second * 3600 * utilization``, or
``requests_per_hour * tokens_per_request * utilization``), per 1,000 tokens;
prompt and completion tokens are priced alike.

Every figure must be a finite number >= 0: a price of ``nan``, ``inf`` or
below zero is refused where it is loaded (the snapshot, the price file, a
route's own price when a cost stage configures) with a
:class:`~nimpipe.errors.ConfigError` naming it, since a ``nan`` price makes
every comparison false and so would switch a budget off.

Nothing here touches the network; the snapshot and the price file are read
the first time a pipeline needs them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.errors import ConfigError
from nimpipe.types import Price, Route, Turn
from nimpipe_contrib._per_pipeline import PerPipeline

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline

__all__ = [
    "COST_STAGES",
    "CostEstimate",
    "PriceBook",
    "PriceOverrides",
    "Snapshot",
    "amortised_price",
    "check_price",
    "completion_limit",
    "estimate_call",
    "estimate_prompt_tokens",
    "load_overrides",
    "load_snapshot",
    "price_book_for",
    "price_problem",
    "price_routes",
    "prompt_token_bound",
    "unreadable_cap",
]

logger = logging.getLogger("nimpipe.pricing")

#: Stages whose ``prices`` setting names the price file.
COST_STAGES = ("ledger", "budget", "router", "cascade")

#: The bundled snapshot, inside the ``nimpipe`` package.
SNAPSHOT_FILE = "nim_prices.json"

#: Source of a self-hosted route's price when the price file gives none.
SELF_HOSTED_FREE = "self-hosted: free (no GPU-hour cost in the price file)"

_PER_TOKEN_KEYS = {"input_per_1k", "output_per_1k"}
_AMORTISED_KEYS = {
    "gpu_hour_usd",
    "gpus",
    "tokens_per_second",
    "requests_per_hour",
    "tokens_per_request",
    "utilization",
}


def _model_key(model: str) -> str:
    return model.strip().lower()


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return number if math.isfinite(number) else None


def _amount(value: Any) -> float | None:
    """``value`` as a float when it is a finite number >= 0, else ``None``."""
    number = _finite_number(value)
    return number if number is not None and number >= 0 else None


def _bad_figure(price: Any) -> tuple[str, Any] | None:
    for name in ("input_per_1k", "output_per_1k"):
        value = getattr(price, name, None)
        if _amount(value) is None:
            return name, value
    return None


def price_problem(price: Any) -> str | None:
    """What is wrong with ``price`` (``"input_per_1k is nan"``), or ``None`` when it is usable.

    A usable price has finite ``input_per_1k`` and ``output_per_1k``, both >= 0.
    """
    bad = _bad_figure(price)
    return None if bad is None else f"{bad[0]} is {bad[1]!r}"


def check_price(price: Price, key: str, path: str | None = None) -> Price:
    """``price`` itself, or a :class:`ConfigError` naming ``key.input_per_1k`` (or output)."""
    bad = _bad_figure(price)
    if bad is not None:
        raise ConfigError(
            f"must be a finite number >= 0, got {bad[1]!r}", path=path, key=f"{key}.{bad[0]}"
        )
    return price


# --------------------------------------------------------------------------
# Amortised self-hosted cost
# --------------------------------------------------------------------------


def amortised_price(
    *,
    gpu_hour_usd: float,
    gpus: float = 1.0,
    tokens_per_second: float | None = None,
    requests_per_hour: float | None = None,
    tokens_per_request: float | None = None,
    utilization: float = 1.0,
    source: str = "",
) -> Price:
    """The per-1k-token price of a self-hosted model from its GPU-hour cost.

    Give the throughput either as ``tokens_per_second`` (prompt plus
    completion tokens the deployment serves per second while busy) or as
    ``requests_per_hour`` with ``tokens_per_request``.  ``utilization`` is the
    share of paid hours it spends serving (idle hours are paid too, so a lower
    utilization makes each token dearer).

    Raises :class:`ValueError` when the figures cannot make a price.
    """
    figures = {
        "gpu_hour_usd": gpu_hour_usd,
        "gpus": gpus,
        "tokens_per_second": tokens_per_second,
        "requests_per_hour": requests_per_hour,
        "tokens_per_request": tokens_per_request,
        "utilization": utilization,
    }
    for name, value in figures.items():
        if value is not None and _finite_number(value) is None:
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if gpu_hour_usd < 0 or gpus <= 0:
        raise ValueError("gpu_hour_usd must be >= 0 and gpus > 0")
    if not 0 < utilization <= 1:
        raise ValueError("utilization must be in (0, 1]")
    if tokens_per_second is not None:
        if requests_per_hour is not None:
            raise ValueError("give tokens_per_second or requests_per_hour, not both")
        tokens_per_hour = tokens_per_second * 3600
        rate = f"{tokens_per_second:g} tok/s"
    elif requests_per_hour is not None and tokens_per_request is not None:
        tokens_per_hour = requests_per_hour * tokens_per_request
        rate = f"{requests_per_hour:g} req/h x {tokens_per_request:g} tok"
    else:
        raise ValueError(
            "an amortised price needs tokens_per_second, or requests_per_hour and "
            "tokens_per_request"
        )
    served = tokens_per_hour * utilization
    if served <= 0:
        raise ValueError("the throughput must be positive")
    per_1k = gpu_hour_usd * gpus / served * 1000
    if not math.isfinite(per_1k):
        raise ValueError("the figures give no finite price")
    how = (
        f"amortised: ${gpu_hour_usd:g}/GPU-h x {gpus:g} GPU / ({rate} x "
        f"{utilization:.0%} busy) = ${per_1k:.6g}/1k tokens"
    )
    return Price(
        input_per_1k=per_1k,
        output_per_1k=per_1k,
        source=f"{source}: {how}" if source else how,
    )


# --------------------------------------------------------------------------
# The bundled snapshot
# --------------------------------------------------------------------------


@attrs.frozen
class Snapshot:
    """The bundled per-model prices: ``version`` and one :class:`Price` per model id."""

    version: str
    prices: Mapping[str, Price] = attrs.field(eq=False)

    def lookup(self, model: str) -> Price | None:
        """The price of ``model`` (case-insensitive), or ``None``."""
        return self.prices.get(_model_key(model))


_snapshots: dict[str, Snapshot] = {}
_snapshot_lock = threading.Lock()


def _bundled_snapshot_path() -> Path:
    import nimpipe

    return Path(nimpipe.__file__).parent / "data" / SNAPSHOT_FILE


def load_snapshot(path: str | os.PathLike[str] | None = None) -> Snapshot:
    """Read a price snapshot (default: the bundled one); cached per path.

    Raises :class:`ConfigError` naming the file and the entry when it is not a
    valid snapshot (every entry needs both prices and a ``source``).
    """
    file = Path(path) if path is not None else _bundled_snapshot_path()
    cache_key = str(file)
    cached = _snapshots.get(cache_key)
    if cached is not None:
        return cached
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read the price snapshot: {exc.strerror}", path=str(file)
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"the price snapshot is not valid JSON: {exc}", path=str(file)) from exc
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise ConfigError("needs a 'version' string", path=str(file), key="version")
    models = data.get("models")
    if not isinstance(models, Mapping):
        raise ConfigError("needs a 'models' object", path=str(file), key="models")
    prices: dict[str, Price] = {}
    for model, entry in models.items():
        key = f"models.{model}"
        if not isinstance(entry, Mapping):
            raise ConfigError("must be an object", path=str(file), key=key)
        source = entry.get("source")
        if not isinstance(source, str) or not source:
            raise ConfigError("every price needs a 'source'", path=str(file), key=f"{key}.source")
        figures = {}
        for name in ("input_per_1k", "output_per_1k"):
            value = _amount(entry.get(name))
            if value is None:
                raise ConfigError(
                    f"must be a finite number >= 0, got {entry.get(name)!r}",
                    path=str(file),
                    key=f"{key}.{name}",
                )
            figures[name] = value
        prices[_model_key(model)] = Price(**figures, source=f"bundled snapshot {version}: {source}")
    snapshot = Snapshot(version, prices)
    with _snapshot_lock:
        _snapshots[cache_key] = snapshot
    return snapshot


# --------------------------------------------------------------------------
# The user's price file
# --------------------------------------------------------------------------


@attrs.frozen
class PriceOverrides:
    """Prices from the user's price file, by route name and by model id."""

    path: str | None = None
    version: str | None = None
    routes: Mapping[str, Price] = attrs.field(factory=dict, eq=False)
    models: Mapping[str, Price] = attrs.field(factory=dict, eq=False)


def _entry_price(entry: Any, key: str, path: str, label: str) -> Price:
    if not isinstance(entry, Mapping):
        raise ConfigError("must be a table", path=path, key=key)
    known = _PER_TOKEN_KEYS | _AMORTISED_KEYS | {"source"}
    for name in entry:
        if name not in known:
            raise ConfigError(
                f"unknown price setting (known: {', '.join(sorted(known))})",
                path=path,
                key=f"{key}.{name}",
            )
    numbers: dict[str, float] = {}
    for name, value in entry.items():
        if name == "source":
            if not isinstance(value, str) or not value:
                raise ConfigError("must be a non-empty string", path=path, key=f"{key}.{name}")
            continue
        number = _amount(value)
        if number is None:
            raise ConfigError(
                f"must be a finite number >= 0, got {value!r}", path=path, key=f"{key}.{name}"
            )
        numbers[name] = number
    origin = f"{label}: {entry['source']}" if "source" in entry else label
    per_token = _PER_TOKEN_KEYS & set(numbers)
    amortised = _AMORTISED_KEYS & set(numbers)
    if per_token and amortised:
        raise ConfigError(
            "give per-token prices (input_per_1k, output_per_1k) or an amortised GPU cost "
            "(gpu_hour_usd, ...), not both",
            path=path,
            key=key,
        )
    if amortised:
        if "gpu_hour_usd" not in numbers:
            raise ConfigError("is required", path=path, key=f"{key}.gpu_hour_usd")
        try:
            return amortised_price(
                gpu_hour_usd=numbers["gpu_hour_usd"],
                gpus=numbers.get("gpus", 1.0),
                tokens_per_second=numbers.get("tokens_per_second"),
                requests_per_hour=numbers.get("requests_per_hour"),
                tokens_per_request=numbers.get("tokens_per_request"),
                utilization=numbers.get("utilization", 1.0),
                source=origin,
            )
        except ValueError as exc:
            raise ConfigError(str(exc), path=path, key=key) from None
    return Price(
        input_per_1k=numbers.get("input_per_1k", 0.0),
        output_per_1k=numbers.get("output_per_1k", 0.0),
        source=origin,
    )


def load_overrides(path: str | os.PathLike[str]) -> PriceOverrides:
    """Read a price file (TOML, see the module docstring).

    Raises :class:`ConfigError` naming the file and the key of any problem.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    file = Path(path).expanduser()
    where = str(file)
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the price file: {exc.strerror}", path=where) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=where) from exc
    for key in data:
        if key not in ("version", "models", "routes"):
            raise ConfigError(
                "unknown setting (known: models, routes, version)", path=where, key=key
            )
    version = data.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise ConfigError("must be a non-empty string", path=where, key="version")
    label = f"price file {where}" + (f" ({version})" if version else "")
    tables: dict[str, dict[str, Price]] = {"routes": {}, "models": {}}
    for section in ("routes", "models"):
        entries = data.get(section, {})
        if not isinstance(entries, Mapping):
            raise ConfigError("must be a table", path=where, key=section)
        for name, entry in entries.items():
            key = name if section == "routes" else _model_key(name)
            tables[section][key] = _entry_price(entry, f"{section}.{name}", where, label)
    return PriceOverrides(where, version, tables["routes"], tables["models"])


# --------------------------------------------------------------------------
# The price book: snapshot + overrides, applied to routes
# --------------------------------------------------------------------------


@attrs.define
class PriceBook:
    """Prices routes and models from the price file and the bundled snapshot."""

    snapshot: Snapshot
    overrides: PriceOverrides = attrs.field(factory=PriceOverrides)

    @classmethod
    def load(cls, overrides: str | os.PathLike[str] | None = None) -> PriceBook:
        """The bundled snapshot plus the price file at ``overrides`` (if given)."""
        return cls(
            load_snapshot(),
            load_overrides(overrides) if overrides is not None else PriceOverrides(),
        )

    def price_for(self, route: Route) -> Price | None:
        """The price of calls on ``route`` (see the module docstring for the order)."""
        if route.price is not None:
            return route.price
        price = self.overrides.routes.get(route.name)
        if price is not None:
            return price
        price = self.overrides.models.get(_model_key(route.model))
        if price is not None:
            return price
        if route.self_hosted:
            return Price(input_per_1k=0.0, output_per_1k=0.0, source=SELF_HOSTED_FREE)
        return self.snapshot.lookup(route.model)

    def priced(self, routes: Iterable[Route]) -> tuple[list[Route], list[Route]]:
        """``routes`` with prices filled in where one is known, and the routes left unpriced."""
        out: list[Route] = []
        unpriced: list[Route] = []
        for route in routes:
            price = self.price_for(route)
            if price is None:
                unpriced.append(route)
                out.append(route)
            elif route.price is None:
                out.append(attrs.evolve(route, price=price))
            else:
                out.append(route)
        return out, unpriced


_warned: set[tuple[str, str]] = set()


def _price_file(pipeline: Pipeline) -> str | None:
    config = pipeline.config
    chosen: tuple[str, str] | None = None
    for stage in COST_STAGES:
        value = config.stage(stage).get("prices")
        if value is None:
            continue
        key = f"stages.{stage}.prices"
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"must be a path, got {value!r}", path=config.source, key=key)
        path = Path(value).expanduser()
        if not path.is_absolute() and config.source:
            path = Path(config.source).parent / path
        if chosen is not None and chosen[1] != str(path):
            raise ConfigError(
                f"names another price file than {chosen[0]} ({chosen[1]}); the cost stages "
                "share one price file",
                path=config.source,
                key=key,
            )
        chosen = (key, str(path))
    if chosen is not None:
        if not Path(chosen[1]).is_file():
            raise ConfigError("price file not found", path=chosen[1], key=chosen[0])
        return chosen[1]
    named = os.environ.get("NIMPIPE_PRICES")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError("price file not found", path=str(path), key="NIMPIPE_PRICES")
        return str(path)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    user = Path(base) / "nimpipe" / "prices.toml"
    return str(user) if user.is_file() else None


_books: PerPipeline[PriceBook] = PerPipeline(lambda pipeline: PriceBook.load(_price_file(pipeline)))


def price_book_for(pipeline: Pipeline) -> PriceBook:
    """The price book of ``pipeline``: built once, shared by its cost stages."""
    return _books.get(pipeline)


def price_routes(pipeline: Pipeline) -> list[Route]:
    """Give every route of ``pipeline`` that has no price its price profile.

    Called by each cost stage's ``configure``; idempotent.  Returns the routes
    left unpriced (each is named once in a warning on the
    ``nimpipe.pricing`` logger).  Raises :class:`ConfigError` naming
    ``routes.NAME.price.input_per_1k`` (or output) when a route's own price is
    not a finite number >= 0.
    """
    for route in pipeline.routes:
        if route.price is not None:
            check_price(route.price, f"routes.{route.name}.price", pipeline.config.source)
    book = price_book_for(pipeline)
    routes, unpriced = book.priced(pipeline.routes)
    changed = [new for new, old in zip(routes, pipeline.routes, strict=True) if new is not old]
    if changed:
        pipeline.replace_routes(*changed)
    for route in unpriced:
        marker = (route.name, route.model)
        if marker not in _warned:
            _warned.add(marker)
            logger.warning(
                "route %r (model %r) has no price: its calls are recorded at cost 0; add it to "
                "the price file (see docs/routing-cost.md)",
                route.name,
                route.model,
            )
    return unpriced


# --------------------------------------------------------------------------
# Estimates before a call
# --------------------------------------------------------------------------

_prompt_cache: dict[tuple[str, int, str], int] = {}
_prompt_cache_lock = threading.Lock()
_PROMPT_CACHE_SIZE = 4096


def estimate_prompt_tokens(turn: Turn, model: str) -> int:
    """Prompt tokens of ``turn`` for ``model``, counted locally (see :mod:`nimpipe.tokens`).

    Counted once per turn and tokenizer: the router, the budget and the
    cascade all ask, and a long prompt takes milliseconds to count.
    """
    from nimpipe import tokens

    encoding = tokens.encoding_for_model(model)
    key = (turn.id, len(turn.messages), encoding)
    found = _prompt_cache.get(key)
    if found is not None:
        return found
    count = tokens.count_messages(turn.messages, model, turn.tools).count
    _remember(key, count)
    return count


def _remember(key: tuple[str, int, str], count: int) -> None:
    with _prompt_cache_lock:
        if len(_prompt_cache) >= _PROMPT_CACHE_SIZE:
            for old in list(_prompt_cache)[: _PROMPT_CACHE_SIZE // 4]:
                _prompt_cache.pop(old, None)
        _prompt_cache[key] = count


#: Chat-template tokens allowed per message, and for priming the reply, in the bound.
_BOUND_PER_MESSAGE = 8
#: Template text a server adds to describe tools (Llama 3.1's tool prompt is about 80 tokens).
_BOUND_TOOL_PROMPT = 128


def _utf8_size(text: str) -> int:
    # Lone surrogates are bad input the provider refuses; they must not break the count.
    return len(text.encode("utf-8", "surrogatepass"))


def prompt_token_bound(turn: Turn) -> int:
    """An upper bound on the prompt tokens of ``turn`` for any byte-level tokenizer.

    Every token of a byte-level BPE or byte-fallback SentencePiece vocabulary
    (Llama, Mistral, Nemotron, GPT) covers at least one byte, so the UTF-8
    size of the messages and tool schemas, plus a few template tokens per
    message (and the tool-calling instructions a chat template adds), is
    never exceeded.  It costs a microsecond where a tokenizer costs tens; it
    overestimates English text about fourfold.
    """
    key = (turn.id, len(turn.messages), "bound")
    found = _prompt_cache.get(key)
    if found is not None:
        return found
    total = _BOUND_PER_MESSAGE * (len(turn.messages) + 1)
    for message in turn.messages:
        if message.content:
            total += _utf8_size(message.content)
        for call in message.tool_calls:
            total += _utf8_size(call.name) + _utf8_size(call.arguments)
    if turn.tools:
        total += _BOUND_TOOL_PROMPT
        total += _utf8_size(json.dumps([t.to_openai() for t in turn.tools]))
    _remember(key, total)
    return total


#: Request fields that cap the completion (servers honour the first they know).
_CAP_FIELDS = ("max_completion_tokens", "max_tokens")


def _cap_fields(turn: Turn, route: Route) -> dict[str, Any]:
    # The same precedence as the request body: extra_body, the route's cap, the turn's params.
    fields = {k: v for k, v in route.extra_body.items() if k in _CAP_FIELDS}
    if route.max_output_tokens is not None:
        fields["max_tokens"] = route.max_output_tokens
    fields.update({k: v for k, v in turn.params.items() if k in _CAP_FIELDS})
    return fields


def _usable_cap(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def completion_limit(turn: Turn, route: Route) -> int | None:
    """The completion cap the request will carry, or ``None`` when it carries none.

    Looks where the request body gets it from (the route's ``extra_body``,
    its ``max_output_tokens``, the turn's ``params``); when both
    ``max_completion_tokens`` and ``max_tokens`` are set the larger counts,
    as servers differ in which they honour.  A value that is not a whole
    number > 0 caps nothing.
    """
    caps = [v for v in _cap_fields(turn, route).values() if _usable_cap(v)]
    return max(caps) if caps else None


def unreadable_cap(turn: Turn, route: Route) -> bool:
    """Whether the request carries a cap field that is not a whole number > 0.

    Such a field (``max_tokens = "lots"``, ``0``, ``1e9``) overrides what a
    stage sets on the route, and what the server makes of it is unknown: a
    cost bound cannot rely on any cap then.
    """
    return any(not _usable_cap(v) for v in _cap_fields(turn, route).values())


@attrs.frozen
class CostEstimate:
    """What a call is expected to cost, before it is made."""

    prompt_tokens: int
    completion_tokens: int
    #: USD; 0 for an unpriced route (see ``priced``).
    usd: float
    priced: bool
    #: Whether ``completion_tokens`` is the request's own cap (a bound, not a guess).
    capped: bool
    #: Whether ``prompt_tokens`` is :func:`prompt_token_bound` rather than a tokenizer count.
    bound: bool = False


def estimate_call(
    turn: Turn,
    route: Route,
    *,
    price: Price | None = None,
    default_completion: int = 512,
    prompt_margin: float = 1.0,
    bound: bool = False,
) -> CostEstimate:
    """The expected cost of sending ``turn`` to ``route``.

    Prompt tokens are counted locally and multiplied by ``prompt_margin``
    (local tokenizers differ from the model's), or with ``bound`` taken from
    :func:`prompt_token_bound`; completion tokens are the request's cap
    (:func:`completion_limit`) when it has one, else ``default_completion``.
    ``price`` defaults to the route's own.  The estimate is ``capped`` only
    when the request carries a readable cap and no unreadable one
    (:func:`unreadable_cap`).
    """
    if bound:
        prompt = prompt_token_bound(turn)
    else:
        model = turn.model or route.model
        prompt = math.ceil(estimate_prompt_tokens(turn, model) * prompt_margin)
    limit = completion_limit(turn, route)
    completion = limit if limit is not None else default_completion
    price = price if price is not None else route.price
    usd = price.cost(prompt, completion) if price is not None else 0.0
    capped = limit is not None and not unreadable_cap(turn, route)
    return CostEstimate(prompt, completion, usd, price is not None, capped, bound)
