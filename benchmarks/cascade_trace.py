"""A replayed trace of turns, costed three ways: cascade, always-frontier, always-cheap.

What it measures
    A scripted trace of ``--turns`` turns (200 by default; ``--hard-share`` of
    them hard, 0.3 by default) is replayed against the NIM-shaped test server,
    started as a child process, serving two models with known prices:

    * ``local``: ``meta/llama-3.1-8b-instruct``, a self-hosted tier-0 route
      priced at an amortised GPU cost ($2.50/GPU-hour, 2,500 tokens/s, 60%
      busy: about $0.00046 per 1k tokens);
    * ``frontier``: ``meta/llama-3.1-405b-instruct``, a hosted tier-1 route
      at the bundled snapshot's price ($0.0035 per 1k tokens).

    The cheap model answers easy prompts well and hard ones badly, in the
    four ways the cascade's scorers catch: it refuses, answers nothing,
    answers in two words where an explanation was asked for, or runs into
    ``max_tokens``.  The frontier answers every prompt well.  Token counts
    are the server's (words), costs are the ledger's.

    The trace runs three times, each on a fresh pipeline with the ``ledger``
    stage: ``cascade`` (stage ``cascade``: cheap first, escalate on a poor
    answer), ``always-frontier`` and ``always-cheap``.

How to read it
    ``cost USD`` is the ledger's total for the mode; ``vs frontier`` that
    cost as a share of always-frontier's; ``escalated`` the share of turns
    the cascade sent on to the frontier; ``poor answers`` the share of final
    answers the scorers still flag (always-cheap's are the hard turns it got
    wrong); ``calls`` model calls made.  Costs scale with the trace's mix:
    ``--hard-share`` moves the escalation share and the saving with it.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_json_argument, print_table, write_json

from nimpipe import Pipeline, Route, Turn
from nimpipe.config import Config
from nimpipe.testing.nim_server import NimServerProcess
from nimpipe_contrib.cost import prices as pricing
from nimpipe_contrib.cost.ledger import Ledger
from nimpipe_contrib.routing.scorers import score_response

CHEAP = "meta/llama-3.1-8b-instruct"
FRONTIER = "meta/llama-3.1-405b-instruct"
MODES = ("cascade", "always-frontier", "always-cheap")

#: Easy prompts: the cheap model's default reply ("NIM reply to: ...") is fine.
EASY = (
    "What is the capital of Portugal?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for quick.",
    "What is 17 times 3?",
    "Name a prime number above 50.",
    "Which planet is closest to the sun?",
    "Spell 'necessary' backwards.",
    "What day follows Thursday?",
)
#: Hard prompts by failure: a marker the cheap model's scripted replies key on.
HARD = {
    "refused": "Write a limerick about GPU schedulers",
    "empty": "Summarize the attached incident report",
    "too_short": "Explain in detail how TCP congestion control reacts to packet loss",
    "truncated": "List every step needed to migrate the billing database",
}
CHEAP_REPLIES = {
    HARD["refused"]: "I'm sorry, but I can't help with that request.",
    HARD["empty"]: "",
    HARD["too_short"]: "It slows down.",
    HARD["truncated"]: " ".join(f"step{i}" for i in range(120)),
}
GOOD = (
    "Here is a complete answer that addresses every part of the question with the "
    "detail it asks for, the reasoning behind each point, and a short example that "
    "shows how the pieces fit together in practice."
)
FRONTIER_REPLIES = {prompt: GOOD for prompt in HARD.values()}
#: ``max_tokens`` of the "truncated" turns: the cheap reply is longer, the frontier's is not.
TRUNCATED_MAX_TOKENS = 60


def build_trace(turns: int, hard_share: float, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``(kind, prompt, params)`` per turn, shuffled with ``seed``."""
    rng = random.Random(seed)
    hard = round(turns * hard_share)
    trace: list[tuple[str, str, dict[str, Any]]] = []
    kinds = list(HARD)
    for i in range(hard):
        kind = kinds[i % len(kinds)]
        params = {"max_tokens": TRUNCATED_MAX_TOKENS} if kind == "truncated" else {}
        trace.append((kind, f"{HARD[kind]} (case {i}).", params))
    for i in range(turns - hard):
        trace.append(("easy", f"{EASY[i % len(EASY)]} (case {i})", {}))
    rng.shuffle(trace)
    return trace


def routes(base_url: str) -> tuple[Route, Route]:
    local = Route(
        name="local",
        base_url=base_url,
        model=CHEAP,
        self_hosted=True,
        tier=0,
        max_retries=0,
        price=pricing.amortised_price(
            gpu_hour_usd=2.5, tokens_per_second=2500, utilization=0.6, source="benchmark"
        ),
    )
    snapshot = pricing.load_snapshot().lookup(FRONTIER)
    assert snapshot is not None
    frontier = Route(
        name="frontier", base_url=base_url, model=FRONTIER, tier=1, max_retries=0, price=snapshot
    )
    return local, frontier


def run_mode(
    mode: str, base_url: str, trace: list[tuple[str, str, dict[str, Any]]], workdir: Path
) -> dict[str, Any]:
    local, frontier = routes(base_url)
    chosen = {
        "cascade": (local, frontier),
        "always-frontier": (frontier,),
        "always-cheap": (local,),
    }
    db = workdir / f"{mode}.sqlite"
    stages: dict[str, Any] = {"ledger": {"path": str(db)}}
    if mode == "cascade":
        stages["cascade"] = {}
    config = Config.from_dict({"stages": stages}, env={}).with_routes(
        *chosen[mode], default=chosen[mode][0].name
    )
    started = time.perf_counter()
    escalated = poor = 0
    turn_cost = 0.0
    with Pipeline.create(config, entrypoints=False) as pipeline:
        for kind, prompt, params in trace:
            result = pipeline.run(Turn.create(prompt, params=params, metadata={"kind": kind}))
            turn_cost += result.cost_usd
            if len(result.records) > 1:
                escalated += 1
            if result.response is not None and score_response(result.turn, result.response):
                poor += 1
        ledger = pipeline.plugins.pm.get_plugin("ledger").ledger
        rows = ledger.report("route")
    elapsed = time.perf_counter() - started
    stored = Ledger.open(db).report("route")
    cost = sum(r.cost_usd for r in stored)
    if abs(cost - turn_cost) > 1e-6 or sum(r.calls for r in rows) != sum(r.calls for r in stored):
        raise SystemExit(f"{mode}: the ledger ({cost}) disagrees with the turns ({turn_cost})")
    return {
        "cost_usd": round(cost, 6),
        "calls": sum(r.calls for r in stored),
        "escalated_turns": escalated,
        "escalated_share": escalated / len(trace),
        "poor_answers": poor,
        "poor_share": poor / len(trace),
        "seconds": round(elapsed, 2),
        "by_route": {r.key: {"calls": r.calls, "cost_usd": round(r.cost_usd, 6)} for r in stored},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Cost of a replayed trace under the cascade, always-frontier and always-cheap.",
        epilog="Read the module docstring for what each figure means.",
    )
    parser.add_argument("--turns", type=int, default=200, help="turns in the trace (200)")
    parser.add_argument("--hard-share", type=float, default=0.3, help="share of hard turns (0.3)")
    parser.add_argument("--seed", type=int, default=7, help="shuffle seed (7)")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds the server waits per reply (0)"
    )
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.hard_share <= 1:
        parser.error("--hard-share must be between 0 and 1")

    trace = build_trace(args.turns, args.hard_share, args.seed)
    models = [
        {"id": CHEAP, "replies": CHEAP_REPLIES},
        {"id": FRONTIER, "replies": FRONTIER_REPLIES},
    ]
    results: dict[str, Any] = {}
    with (
        NimServerProcess(models=models, latency=args.latency) as server,
        tempfile.TemporaryDirectory(prefix="nimpipe-trace-") as workdir,
    ):
        for mode in MODES:
            results[mode] = run_mode(mode, server.base_url, trace, Path(workdir))

    frontier_cost = results["always-frontier"]["cost_usd"]
    rows = [
        (
            mode,
            f"{r['cost_usd']:.6f}",
            f"{r['cost_usd'] / frontier_cost:.1%}" if frontier_cost else "-",
            f"{r['escalated_share']:.1%}" if mode == "cascade" else "-",
            f"{r['poor_share']:.1%}",
            r["calls"],
        )
        for mode, r in results.items()
    ]
    print_table(
        f"{args.turns} turns, {args.hard_share:.0%} hard (seed {args.seed})",
        ("mode", "cost USD", "vs frontier", "escalated", "poor answers", "calls"),
        rows,
    )
    cascade = results["cascade"]
    saving = 1 - cascade["cost_usd"] / frontier_cost if frontier_cost else 0.0
    print(
        f"\ncascade: {saving:.0%} cheaper than always-frontier, {cascade['escalated_share']:.0%} "
        f"of turns escalated, {cascade['poor_share']:.0%} poor answers "
        f"(always-cheap: {results['always-cheap']['poor_share']:.0%})"
    )
    write_json(
        args.json,
        "cascade_trace",
        {
            "turns": args.turns,
            "hard_share": args.hard_share,
            "seed": args.seed,
            "prices": {
                name: {"input_per_1k": r.price.input_per_1k, "output_per_1k": r.price.output_per_1k}
                for name, r in zip(("local", "frontier"), routes("http://x/v1"), strict=True)
                if r.price is not None
            },
            "modes": results,
            "cascade_saving_vs_frontier": saving,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
