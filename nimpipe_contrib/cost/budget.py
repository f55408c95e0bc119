"""Stage ``budget``: spend limits per day, per month and per agent that hold under concurrency.

Before every model call (``before_call``, ``trylast`` so that it has the last
word) the stage estimates what the call can cost and *reserves* that amount
against every limit the call falls under, atomically: the check and the
reservation happen under one lock, so 64 concurrent calls cannot all see the
same headroom.  After the call, ``record_cost`` (which follows every call
made, failed and cancelled ones too) replaces the reservation with the real
cost.  Spend therefore stays within each limit as long as a call never costs
more than its reservation, which the stage makes true by construction:

- the completion is bounded: the reservation counts the request's cap (the
  larger of ``max_tokens`` and ``max_completion_tokens`` wherever the request
  gets them: the turn's params, the route's ``max_output_tokens`` or its
  ``extra_body``); when a request carries none, the stage sets the route's
  ``max_output_tokens`` to ``default_completion_tokens`` (setting
  ``cap_completion``, on by default) and reserves that many.  With
  ``cap_completion = false``, or a cap field that is not a whole number > 0
  (what the server makes of ``max_tokens = "lots"`` is unknown), the call is
  uncapped and the stage reserves the whole context: the route's
  ``context_length``, or :data:`UNCAPPED_COMPLETION_TOKENS` when that is
  unknown;
- the prompt is bounded too: by default (``prompt_estimate = "bound"``) the
  reservation counts one token per byte of the messages and tool schemas
  plus a few template tokens per message, a bound no byte-level tokenizer
  (Llama, Mistral, Nemotron, GPT) exceeds, and one that costs a microsecond
  to compute.  ``"tokenizer"`` counts with the local tokenizer times
  ``prompt_margin`` (1.1) instead: tighter (about a quarter of the bound for
  English text), so fewer calls are refused near a limit, but an estimate.

The provider charges at most the cap for a reply that reports more
completion tokens than the request allowed (a server ignoring ``max_tokens``),
so a reply through nimpipe's provider never costs more than its
reservation.  The stage does not trust a record's figures either (records
also come from jaato, other providers and replayed traces):

- a record whose cost is negative, ``nan``, infinite or above $1,000,000,
  or whose token counts are negative, not whole or above 10**9, is charged
  its reservation (or, with none, the most its route could cost for the
  tokens it names, an impossible count taken as the context length), never
  less, and counted in ``invalid_records`` with a warning: impossible usage
  cannot create headroom;
- a record that costs more than its reservation is charged in full (the spend
  is real), counted in ``overruns`` with a warning, and when it pushes spend
  past a limit the overshoot is logged as an error and shown as
  :attr:`BudgetStatus.overshoot_usd`; every further call under that limit is
  refused at once, as no headroom is left;
- a route price that is ``nan``, infinite or negative refuses the call
  (``Block(rule="budget:invalid-price")``), even with ``unpriced = "allow"``.

At a limit, ``on_limit = "downgrade"`` (default) sends the call to the
cheapest route whose estimate still fits (a free self-hosted route always
fits), and ``"refuse"`` ends the turn with ``Block(rule="budget:daily")``
(``budget:monthly``, ``budget:agent-daily``, ``budget:agent-monthly``,
``budget:unpriced``, ``budget:invalid-price``) whose message tells the user
which budget is used up.
An escalation that the budget cannot afford is skipped (``filter_routes``)
and the answer already in hand is kept.

Settings (``[stages.budget]``)::

    daily_usd = 20.0             # all agents together, per day
    monthly_usd = 400.0          # all agents together, per calendar month
    agent_daily_usd = 2.0        # each agent id, per day
    agent_monthly_usd = 40.0     # each agent id, per month
    on_limit = "downgrade"       # or "refuse"
    timezone = "UTC"             # where days and months start
    default_completion_tokens = 512
    cap_completion = true
    prompt_estimate = "bound"    # or "tokenizer"
    prompt_margin = 1.1          # with "tokenizer"
    unpriced = "refuse"          # or "allow": calls on a route with no known price
    seed_from_ledger = true      # start from today's/this month's spend in the ledger
    reservation_ttl = 900        # seconds before a reservation with no record is dropped

    [stages.budget.agents.orchestrator]   # an agent id (else an agent type)
    daily_usd = 10.0
    monthly_usd = 150.0

Limits are finite amounts >= 0: ``nan``, ``inf`` or a negative limit is a
``ConfigError`` naming the key.

Scope: the limits hold for the calls of one process (every pipeline thread
and task of it), starting from the spend the ledger held when the stage was
configured.  Several processes sharing one budget each enforce their own
view: give each a share of the fleet's limit.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._markers import hookimpl
from nimpipe.types import Attempt, Block, CallRecord, Route, Turn
from nimpipe_contrib._settings import StageSettings
from nimpipe_contrib.cost import prices as pricing
from nimpipe_contrib.routing.reasons import reasons_for

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.routing.reasons import RouteReasons

__all__ = ["UNCAPPED_COMPLETION_TOKENS", "BudgetStage", "BudgetStatus", "Limit", "create_plugin"]

logger = logging.getLogger("nimpipe.budget")

STAGE = "budget"
_KNOWN = (
    "daily_usd",
    "monthly_usd",
    "agent_daily_usd",
    "agent_monthly_usd",
    "agents",
    "on_limit",
    "timezone",
    "default_completion_tokens",
    "cap_completion",
    "prompt_estimate",
    "prompt_margin",
    "unpriced",
    "seed_from_ledger",
    "reservation_ttl",
    "prices",
)
#: Allowed rounding slack when comparing money (a billionth of a dollar).
_EPSILON = 1e-9
#: Turns remembered to tell a first call from an escalation (``filter_routes``).
_TURN_MEMORY = 8192
#: Completion tokens reserved for an uncapped call on a route of unknown context length.
UNCAPPED_COMPLETION_TOKENS = 131_072
#: A token count above this in a record is impossible (no model has such a context).
_MAX_TOKENS = 10**9
#: A cost above this for one call is impossible (10**9 tokens at the dearest list prices).
_MAX_CALL_USD = 1e6

#: A spend bucket: (period kind, period key, scope); scope ``*`` is every agent.
Bucket = tuple[str, str, str]


@attrs.frozen
class Limit:
    """One spend limit: ``usd`` per ``period`` (``day``/``month``) for ``agent`` (``*``: all)."""

    rule: str
    period: str
    usd: float
    agent: str = "*"


@attrs.frozen
class BudgetStatus:
    """A limit's state in the current period."""

    rule: str
    period: str
    scope: str
    limit_usd: float
    spent_usd: float
    reserved_usd: float

    @property
    def left_usd(self) -> float:
        """What is left to reserve."""
        return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)

    @property
    def overshoot_usd(self) -> float:
        """Spend beyond the limit (0 unless a call cost more than its reservation)."""
        return max(0.0, self.spent_usd - self.limit_usd)


@attrs.define
class _Reservation:
    usd: float
    buckets: tuple[tuple[Limit, Bucket], ...]
    created: float


@attrs.frozen
class _Cost:
    """What a call may cost at most, and the route to send it on."""

    #: USD to reserve; ``None`` when the call cannot be priced and is refused.
    usd: float | None
    #: The route with the completion cap the reservation assumed, when the stage sets it.
    capped_route: Route | None = None
    #: With ``usd`` None: the rule refusing the call, and why.
    rule: str = "budget:unpriced"
    problem: str = ""


@attrs.define
class BudgetStage:
    """The ``budget`` stage of one pipeline."""

    limits: tuple[Limit, ...] = ()
    agent_limits: dict[str, tuple[Limit, ...]] = attrs.field(factory=dict)
    on_limit: str = "downgrade"
    default_completion: int = 512
    cap_completion: bool = True
    prompt_margin: float = 1.1
    #: Reserve for the prompt's byte bound (True) or its tokenizer count x margin.
    bound_prompt: bool = True
    allow_unpriced: bool = False
    reservation_ttl: float = 900.0
    timezone: _dt.tzinfo = _dt.timezone.utc
    #: Calls whose real cost exceeded their reservation (should stay 0).
    overruns: int = 0
    #: Records with an impossible cost or token count (charged at least their reservation).
    invalid_records: int = 0
    _spent: dict[Bucket, float] = attrs.field(factory=dict, init=False)
    _reserved: dict[Bucket, float] = attrs.field(factory=dict, init=False)
    _reservations: dict[tuple[str, int], _Reservation] = attrs.field(factory=dict, init=False)
    #: Turn id -> the number of its latest call (tells a first call from an escalation).
    _seen_turns: OrderedDict[str, int] = attrs.field(factory=OrderedDict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _seeded: threading.Event = attrs.field(factory=threading.Event, init=False)
    _last_sweep: float = attrs.field(default=0.0, init=False)
    _period_cache: tuple[float, float, tuple[str, str]] = attrs.field(
        default=(0.0, 0.0, ("", "")), init=False
    )
    _capped_routes: dict[Route, Route] = attrs.field(factory=dict, init=False)
    _reasons: RouteReasons | None = attrs.field(default=None, init=False)
    _book: pricing.PriceBook | None = attrs.field(default=None, init=False)

    # ------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        settings = StageSettings.of(pipeline, STAGE)
        self.apply_settings(settings)
        pricing.price_routes(pipeline)
        self._book = pricing.price_book_for(pipeline)
        self._reasons = reasons_for(pipeline)
        if settings.boolean("seed_from_ledger", True) and "ledger" in pipeline.config.stages:
            ledger_settings = StageSettings.from_config(pipeline.config, "ledger")
            threading.Thread(
                target=self._seed, args=(ledger_settings,), name="nimpipe-budget-seed", daemon=True
            ).start()
        else:
            self._seeded.set()

    def apply_settings(self, settings: StageSettings) -> None:
        """Read a ``[stages.budget]`` table (raises ``ConfigError`` naming the key)."""
        settings.only(_KNOWN)
        limits = []
        for key, rule, period in (
            ("daily_usd", "budget:daily", "day"),
            ("monthly_usd", "budget:monthly", "month"),
        ):
            usd = _finite(settings, key, None)
            if usd is not None:
                limits.append(Limit(rule, period, usd))
        defaults = []
        for key, rule, period in (
            ("agent_daily_usd", "budget:agent-daily", "day"),
            ("agent_monthly_usd", "budget:agent-monthly", "month"),
        ):
            usd = _finite(settings, key, None)
            if usd is not None:
                defaults.append(Limit(rule, period, usd, agent="each"))
        agents = settings.sub("agents")
        self.agent_limits = {"*": tuple(defaults)}
        for name in agents.table:
            table = agents.sub(name)
            table.only(("daily_usd", "monthly_usd"))
            own = []
            for key, rule, period in (
                ("daily_usd", "budget:agent-daily", "day"),
                ("monthly_usd", "budget:agent-monthly", "month"),
            ):
                usd = _finite(table, key, None)
                if usd is not None:
                    own.append(Limit(rule, period, usd, agent=name))
            self.agent_limits[name] = tuple(own)
        self.limits = tuple(limits)
        self.on_limit = settings.choice("on_limit", ("downgrade", "refuse"), "downgrade")
        self.default_completion = settings.integer("default_completion_tokens", 512, minimum=1)
        if self.default_completion > _MAX_TOKENS:
            raise settings.fail("default_completion_tokens", f"must be at most {_MAX_TOKENS}")
        self.cap_completion = settings.boolean("cap_completion", True)
        self.prompt_margin = _finite(settings, "prompt_margin", 1.1, minimum=1.0)
        estimate = settings.choice("prompt_estimate", ("bound", "tokenizer"), "bound")
        self.bound_prompt = estimate == "bound"
        self.allow_unpriced = settings.choice("unpriced", ("refuse", "allow"), "refuse") == "allow"
        self.reservation_ttl = _finite(settings, "reservation_ttl", 900.0, minimum=1.0)
        self.timezone = _zone(settings)

    def _seed(self, ledger_settings: StageSettings) -> None:
        from nimpipe_contrib.cost.ledger import Ledger

        try:
            ledger = Ledger.from_settings(ledger_settings)
            now = time.time()
            day, month = self._periods(now)
            day_start, month_start = self._period_starts(now)
            day_total, day_agents = ledger.spend(day_start, flush=False)
            month_total, month_agents = ledger.spend(month_start, flush=False)
        except Exception as exc:
            logger.warning("budget: cannot read today's spend from the ledger: %s", exc)
            self._seeded.set()
            return
        with self._lock:
            # A ledger written before its figures were checked may hold negative sums.
            self._add(("day", day, "*"), max(0.0, day_total))
            self._add(("month", month, "*"), max(0.0, month_total))
            for agent, usd in day_agents.items():
                self._add(("day", day, agent), max(0.0, usd))
            for agent, usd in month_agents.items():
                self._add(("month", month, agent), max(0.0, usd))
        self._seeded.set()

    # ------------------------------------------------------------------
    # accounting
    # ------------------------------------------------------------------

    def _periods(self, when: float) -> tuple[str, str]:
        # Day and month keys change once a day: keep the current day's keys.
        start, end, keys = self._period_cache
        if start <= when < end:
            return keys
        local = _dt.datetime.fromtimestamp(when, self.timezone)
        keys = local.strftime("%Y-%m-%d"), local.strftime("%Y-%m")
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        tomorrow = (day + _dt.timedelta(days=1)).replace(hour=0, minute=0, second=0)
        # Local midnight may move with daylight saving: compute it from the calendar.
        next_start = _dt.datetime.combine(
            tomorrow.date(), _dt.time(), tzinfo=self.timezone
        ).timestamp()
        self._period_cache = (day.timestamp(), next_start, keys)
        return keys

    def _period_starts(self, when: float) -> tuple[float, float]:
        local = _dt.datetime.fromtimestamp(when, self.timezone)
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return day.timestamp(), day.replace(day=1).timestamp()

    def _limits_for(self, agent_id: str, agent_type: str) -> tuple[Limit, ...]:
        own = self.agent_limits.get(agent_id)
        if own is None:
            own = self.agent_limits.get(agent_type)
        if own is None:
            own = self.agent_limits.get("*", ())
        return self.limits + own

    def _buckets(self, agent_id: str, agent_type: str, when: float) -> list[tuple[Limit, Bucket]]:
        day, month = self._periods(when)
        out = []
        for limit in self._limits_for(agent_id, agent_type):
            key = day if limit.period == "day" else month
            scope = "*" if limit.agent == "*" else agent_id
            out.append((limit, (limit.period, key, scope)))
        return out

    def _add(self, bucket: Bucket, usd: float) -> None:
        # Only checked, finite amounts >= 0 arrive here (see _charge).
        self._spent[bucket] = self._spent.get(bucket, 0.0) + usd

    def _exceeded(self, buckets: list[tuple[Limit, Bucket]], usd: float) -> Limit | None:
        for limit, bucket in buckets:
            used = self._spent.get(bucket, 0.0) + self._reserved.get(bucket, 0.0)
            if used + usd > limit.usd + _EPSILON:
                return limit
        return None

    def _reserve(
        self, key: tuple[str, int], usd: float, buckets: list[tuple[Limit, Bucket]]
    ) -> None:
        pairs = tuple(buckets)
        previous = self._reservations.pop(key, None)
        if previous is not None:
            self._release(previous)
        for _, bucket in pairs:
            self._reserved[bucket] = self._reserved.get(bucket, 0.0) + usd
        self._reservations[key] = _Reservation(usd, pairs, time.monotonic())

    def _release(self, reservation: _Reservation) -> None:
        for _, bucket in reservation.buckets:
            left = self._reserved.get(bucket, 0.0) - reservation.usd
            if left <= _EPSILON:
                self._reserved.pop(bucket, None)
            else:
                self._reserved[bucket] = left

    def _sweep(self, now: float) -> None:
        # Reservations whose call never produced a record (a crashed hook) expire.
        if now - self._last_sweep < 10.0:
            return
        self._last_sweep = now
        stale = [k for k, r in self._reservations.items() if now - r.created > self.reservation_ttl]
        for key in stale:
            self._release(self._reservations.pop(key))
        if stale:
            logger.warning("budget: released %d reservations with no call record", len(stale))
        today, month = self._periods(time.time())
        for bucket in [b for b in self._spent if b[1] not in (today, month)]:
            if bucket not in self._reserved:
                del self._spent[bucket]

    def _remember(self, turn_id: str, attempt: int) -> None:
        seen = self._seen_turns
        seen[turn_id] = attempt
        if len(seen) > _TURN_MEMORY:
            seen.popitem(last=False)

    # ------------------------------------------------------------------
    # estimates
    # ------------------------------------------------------------------

    def _price(self, route: Route) -> Any:
        if route.price is not None or self._book is None:
            return route.price
        return self._book.price_for(route)

    def _estimate(self, turn: Turn, route: Route) -> _Cost:
        """The most ``turn`` can cost on ``route``: the prompt bound plus the worst completion."""
        price = self._price(route)
        if price is None:
            return _Cost(0.0) if self.allow_unpriced else _Cost(None)
        problem = pricing.price_problem(price)
        if problem is not None:
            return _Cost(None, rule="budget:invalid-price", problem=problem)
        if price.input_per_1k == 0 and price.output_per_1k == 0:
            return _Cost(0.0)
        completion, capped_route = self._worst_completion(turn, route)
        if self.bound_prompt:
            prompt = pricing.prompt_token_bound(turn)
        else:
            model = turn.model or route.model
            prompt = math.ceil(pricing.estimate_prompt_tokens(turn, model) * self.prompt_margin)
        return _Cost(price.cost(prompt, completion), capped_route)

    def _worst_completion(self, turn: Turn, route: Route) -> tuple[int, Route | None]:
        """Completion tokens the call can produce at most, and the capped route if one is needed."""
        limit = pricing.completion_limit(turn, route)
        if limit is not None and not pricing.unreadable_cap(turn, route):
            return limit, None
        if self.cap_completion:
            capped = self._capped_routes.get(route)
            if capped is None:
                capped = attrs.evolve(route, max_output_tokens=self.default_completion)
                self._capped_routes[route] = capped
            limit = pricing.completion_limit(turn, capped)
            if limit is not None and not pricing.unreadable_cap(turn, capped):
                return limit, capped
        # No cap the server is sure to honour: the whole context is the worst case.
        return route.context_length or UNCAPPED_COMPLETION_TOKENS, None

    def _fits(self, turn: Turn, route: Route, now: float) -> bool:
        usd = self._estimate(turn, route).usd
        if usd is None:
            return False
        if usd == 0:
            return True
        buckets = self._buckets(turn.agent_id, turn.agent_type, now)
        with self._lock:
            return self._exceeded(buckets, usd) is None

    # ------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------

    @hookimpl
    def filter_routes(self, turn: Turn, routes: tuple[Route, ...]) -> tuple[Route, ...] | None:
        self._seeded.wait(30.0)
        calls = self._seen_turns.get(turn.id, 0)
        if self.on_limit == "refuse" and not calls:
            return None
        now = time.time()
        fitting = tuple(r for r in routes if self._fits(turn, r, now))
        if len(fitting) == len(routes):
            return None
        if not fitting and not calls:
            return None  # before_call refuses with a message naming the budget
        if self._reasons is not None:
            dropped = ", ".join(r.name for r in routes if r not in fitting)
            self._reasons.note(turn.id, calls + 1, STAGE, f"over the limit on {dropped}")
        return fitting

    @hookimpl(trylast=True)
    def before_call(
        self, turn: Turn, route: Route, attempt: Attempt, pipeline: Pipeline
    ) -> Route | Block | None:
        self._seeded.wait(30.0)
        now = time.time()
        key = (turn.id, attempt.number)
        buckets = self._buckets(turn.agent_id, turn.agent_type, now)
        cost = self._estimate(turn, route)
        usd = cost.usd
        with self._lock:
            self._remember(turn.id, attempt.number)
            self._sweep(time.monotonic())
            if usd is not None:
                failing = self._exceeded(buckets, usd) if usd > 0 else None
                if failing is None:
                    if usd > 0:
                        self._reserve(key, usd, buckets)
                    return cost.capped_route
            else:
                failing = Limit(cost.rule, "call", 0.0)
        if self.on_limit == "downgrade":
            target = self._downgrade(turn, route, attempt, pipeline, key, buckets)
            if target is not None:
                return target
        return self._refusal(failing, route, usd, buckets, cost.problem)

    def _downgrade(
        self,
        turn: Turn,
        route: Route,
        attempt: Attempt,
        pipeline: Pipeline,
        key: tuple[str, int],
        buckets: list[tuple[Limit, Bucket]],
    ) -> Route | None:
        candidates = []
        for other in pipeline.routes:
            if other.name == route.name or other.name in attempt.tried:
                continue
            cost = self._estimate(turn, other)
            if cost.usd is not None:
                candidates.append((cost.usd, other.tier, other.name, other, cost.capped_route))
        for usd, _, _, other, capped in sorted(candidates, key=lambda c: c[:3]):
            with self._lock:
                if usd > 0 and self._exceeded(buckets, usd) is not None:
                    continue
                if usd > 0:
                    self._reserve(key, usd, buckets)
            if self._reasons is not None:
                self._reasons.note(
                    turn.id,
                    attempt.number,
                    STAGE,
                    f"downgraded from {route.name} to {other.name} (~${usd:.6f}): limit reached",
                )
            return capped or other
        return None

    def _refusal(
        self,
        limit: Limit,
        route: Route,
        usd: float | None,
        buckets: list[tuple[Limit, Bucket]],
        problem: str = "",
    ) -> Block:
        if limit.rule == "budget:unpriced":
            return Block(
                reason=f"route {route.name!r} (model {route.model!r}) has no known price",
                rule=limit.rule,
                message=(
                    f"The model budget cannot price route {route.name!r}; add its price to the "
                    "price file or set unpriced = 'allow'."
                ),
            )
        if limit.rule == "budget:invalid-price":
            return Block(
                reason=f"route {route.name!r} (model {route.model!r}) has an invalid price: "
                f"{problem}",
                rule=limit.rule,
                message=(
                    f"The model budget cannot price route {route.name!r}: its price is not a "
                    "finite number >= 0; fix it in nimpipe.toml or the price file."
                ),
            )
        bucket = next(b for lim, b in buckets if lim is limit)
        with self._lock:
            spent = self._spent.get(bucket, 0.0)
            reserved = self._reserved.get(bucket, 0.0)
        whose = "" if limit.agent == "*" else f" of agent {bucket[2]!r}"
        label = {"day": "daily", "month": "monthly"}[limit.period]
        again = {"day": "tomorrow", "month": "next month"}[limit.period]
        return Block(
            reason=(
                f"{label} budget{whose} of ${limit.usd:.2f} reached: ${spent:.6f} spent, "
                f"${reserved:.6f} reserved by calls in flight, this call needs ~${usd or 0:.6f}"
            ),
            rule=limit.rule,
            message=(
                f"The {label} model budget{whose} (${limit.usd:.2f}) is used up; try again {again}."
            ),
        )

    @hookimpl
    def record_cost(self, record: CallRecord, pipeline: Pipeline) -> None:
        key = (record.turn_id, record.attempt)
        # A transport retry (outcome "retried" with an error) is followed by
        # another try of the same call: its reservation stays until then.
        settles = not (record.outcome == "retried" and record.error is not None)
        problem = _record_problem(record)
        with self._lock:
            reservation = self._reservations.get(key)
            if reservation is not None:
                buckets = reservation.buckets
                if settles:
                    del self._reservations[key]
                    self._release(reservation)
            else:
                when = record.time if _is_time(record.time) else time.time()
                buckets = tuple(self._buckets(str(record.agent_id), str(record.agent_type), when))
        if problem is None:
            charge = float(record.cost_usd)
        else:
            charge = self._charge_invalid(record, reservation, pipeline, problem)
        with self._lock:
            if charge > 0:
                for _, bucket in buckets:
                    self._add(bucket, charge)
            if reservation is None or not settles or charge <= reservation.usd + _EPSILON:
                return
            self.overruns += 1
            over = [
                (limit, self._spent.get(bucket, 0.0))
                for limit, bucket in buckets
                if self._spent.get(bucket, 0.0) > limit.usd + _EPSILON
            ]
        logger.warning(
            "budget: call %s/%d cost $%.6f, more than the $%.6f reserved",
            record.turn_id,
            record.attempt,
            charge,
            reservation.usd,
        )
        for limit, spent in over:
            logger.error(
                "budget: %s limit of $%.6f overshot by $%.6f (a call cost more than its "
                "worst case); further calls under it are refused",
                limit.rule,
                limit.usd,
                spent - limit.usd,
            )

    def _charge_invalid(
        self,
        record: CallRecord,
        reservation: _Reservation | None,
        pipeline: Pipeline,
        problem: str,
    ) -> float:
        """The charge for a record with impossible figures: never below its worst case."""
        floor = reservation.usd if reservation is not None else self._worst_of(record, pipeline)
        cost = record.cost_usd
        charge = max(floor, float(cost)) if _is_amount(cost) else floor
        with self._lock:
            self.invalid_records += 1
        logger.warning(
            "budget: call %s/%s on route %r reported %s; charged $%.6f (%s)",
            record.turn_id,
            record.attempt,
            record.route,
            problem,
            charge,
            "its reservation" if reservation is not None else "the most it could cost",
        )
        return charge

    def _worst_of(self, record: CallRecord, pipeline: Pipeline) -> float:
        # A record with no reservation (made outside this pipeline's before_call).
        route = pipeline.config.routes.get(record.route) if isinstance(record.route, str) else None
        price = self._price(route) if route is not None else None
        if price is None or pricing.price_problem(price) is not None:
            return 0.0
        context = route.context_length if route is not None and route.context_length else None
        most = context or UNCAPPED_COMPLETION_TOKENS
        prompt = record.prompt_tokens if _is_count(record.prompt_tokens) else most
        completion = record.completion_tokens if _is_count(record.completion_tokens) else most
        return float(price.cost(min(prompt, most), min(completion, most)))

    # ------------------------------------------------------------------
    # reporting
    # ------------------------------------------------------------------

    def status(
        self, agent_id: str | None = None, agent_type: str | None = None
    ) -> list[BudgetStatus]:
        """Every limit that applies now (to ``agent_id``, when given), with its spend."""
        now = time.time()
        rows = []
        agent = agent_id or "main"
        with self._lock:
            for limit, bucket in self._buckets(agent, agent_type or agent, now):
                if limit.agent != "*" and agent_id is None:
                    continue
                rows.append(
                    BudgetStatus(
                        rule=limit.rule,
                        period=bucket[1],
                        scope=bucket[2],
                        limit_usd=limit.usd,
                        spent_usd=self._spent.get(bucket, 0.0),
                        reserved_usd=self._reserved.get(bucket, 0.0),
                    )
                )
        return rows

    @property
    def reservations(self) -> int:
        """Calls holding a reservation right now."""
        return len(self._reservations)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_TOKENS


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_amount(value: Any) -> bool:
    number = _number(value)
    return number is not None and 0 <= number <= _MAX_CALL_USD


def _is_time(value: Any) -> bool:
    # A Unix time between 1970 and the year 5138.
    number = _number(value)
    return number is not None and 0 <= number < 1e11


def _record_problem(record: CallRecord) -> str | None:
    """Why ``record``'s figures cannot be charged as they stand, or ``None``."""
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(record, name, None)
        if not _is_count(value):
            return f"{name} = {value!r:.40} (a whole number 0..{_MAX_TOKENS} is possible)"
    cost = getattr(record, "cost_usd", None)
    if not _is_amount(cost):
        return f"cost_usd = {cost!r:.40} (an amount from 0 to ${_MAX_CALL_USD:g} is possible)"
    return None


def _finite(settings: StageSettings, key: str, default: Any, *, minimum: float = 0.0) -> Any:
    """A finite number >= ``minimum`` (``nan`` and negatives are refused by the reader)."""
    value = settings.number(key, default, minimum=minimum)
    if value is not None and not math.isfinite(value):
        raise settings.fail(key, f"must be a finite number, got {value!r}")
    return value


def _zone(settings: StageSettings) -> _dt.tzinfo:
    name = settings.string("timezone", "UTC")
    if name.upper() == "UTC":
        return _dt.timezone.utc
    try:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        zone: ZoneInfo = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise settings.fail("timezone", f"unknown time zone {name!r}") from None
    return zone


def create_plugin() -> BudgetStage:
    """A fresh ``budget`` stage for one pipeline."""
    return BudgetStage()
