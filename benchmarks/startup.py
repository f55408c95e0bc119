"""Start-up cost: ``import nimpipe`` and ``nimpipe --help`` against a bare interpreter.

What it measures
    Each figure is the median of ``--runs`` fresh subprocesses (5 by
    default), run alternately with its baseline after one untimed run of
    each (which also leaves the bytecode cache written):

    * ``import nimpipe`` under ``python -X importtime``: the cumulative
      microseconds on the last line of the report, which is the ``nimpipe``
      package with everything it pulls in; and the sum over all top-level
      lines, which includes the interpreter's own start-up imports.  The
      baseline ``python -X importtime -c pass`` gives the latter alone.
    * wall time of ``python -c "import nimpipe"`` against ``python -c pass``;
    * wall time of ``nimpipe --help`` against ``python -c pass``.

    It also prints which heavy modules are in ``sys.modules`` after
    ``import nimpipe`` (``openai``, ``tiktoken``, ``nemoguardrails``,
    ``httpx``: none should be) and, for information, after touching
    ``nimpipe.Pipeline``.

How to read it
    ``added`` is nimpipe's figure minus the baseline's; ``ratio`` their
    quotient.  ``-X importtime`` slows imports down, so its figures are for
    comparing import trees; the wall times are what a user waits.  For
    scale: ``import openai`` alone takes 1.2-1.5 s on these machines and
    ``import litellm`` about 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import add_json_argument, percentile, print_table, rotation, write_json

#: Modules ``import nimpipe`` must not load.
HEAVY = ("openai", "tiktoken", "nemoguardrails", "httpx")

_CHECK_MODULES = """
import json, sys
import nimpipe
after_import = {{m: m in sys.modules for m in {heavy!r}}}
nimpipe.Pipeline
after_pipeline = {{m: m in sys.modules for m in {heavy!r}}}
print(json.dumps({{"import nimpipe": after_import, "nimpipe.Pipeline": after_pipeline}}))
"""


def child_env() -> dict[str, str]:
    """The environment of the children: bytecode caching on, no plugins from entry points."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["NIMPIPE_LOAD_PLUGINS"] = ""
    return env


def nimpipe_command() -> list[str]:
    """The ``nimpipe`` console script next to this interpreter (else ``-m nimpipe.cli``)."""
    script = Path(sys.executable).with_name("nimpipe")
    if script.is_file():
        return [str(script)]
    found = shutil.which("nimpipe")
    return [found] if found else [sys.executable, "-m", "nimpipe.cli"]


def run(
    command: Sequence[str], env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``command``; return its wall time in ms and its outcome.  Fails loudly on error."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall_ms = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return wall_ms, done


def importtime_us(stderr: str) -> tuple[float, float]:
    """From ``-X importtime`` output: (cumulative us of the last line, sum over top-level lines)."""
    last = 0.0
    total = 0.0
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line[len("import time:") :].split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        cumulative = float(fields[1])
        last = cumulative
        if not fields[2].startswith("  "):
            total += cumulative
    return last, total


def alternate(
    pair: dict[str, Callable[[], dict[str, float]]], runs: int
) -> dict[str, list[dict[str, float]]]:
    """One untimed run of each, then ``runs`` runs of each, the order rotating every round."""
    names = list(pair)
    for name in names:
        pair[name]()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(runs):
        for name in rotation(names, i):
            samples[name].append(pair[name]())
    return samples


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: percentile([s[key] for s in samples], 50) for key in samples[0]}


def comparison_rows(
    label: str, base: dict[str, float], ours: dict[str, float], key: str, unit: str
) -> list[Any]:
    b, o = base[key], ours[key]
    return [label, f"{b:,.1f} {unit}", f"{o:,.1f} {unit}", f"{o - b:,.1f} {unit}", f"{o / b:.2f}x"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start-up cost of nimpipe against a bare interpreter.",
        epilog="Read the module docstring (python -m pydoc benchmarks/startup.py) for the "
        "meaning of each figure.",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed subprocesses per command (default 5)"
    )
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be positive")

    env = child_env()
    python = sys.executable
    cli = nimpipe_command()
    print(f"python {sys.version.split()[0]} at {python}; nimpipe CLI: {' '.join(cli)}")

    def importtime_of(code: str) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            wall, done = run([python, "-X", "importtime", "-c", code], env)
            last, total = importtime_us(done.stderr)
            return {"last_line_us": last, "all_imports_us": total, "wall_ms": wall}

        return measure

    def wall_of(command: list[str]) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            return {"wall_ms": run(command, env)[0]}

        return measure

    importtime = alternate(
        {"pass": importtime_of("pass"), "import nimpipe": importtime_of("import nimpipe")},
        args.runs,
    )
    import_wall = alternate(
        {
            "pass": wall_of([python, "-c", "pass"]),
            "import": wall_of([python, "-c", "import nimpipe"]),
        },
        args.runs,
    )
    help_wall = alternate(
        {"pass": wall_of([python, "-c", "pass"]), "help": wall_of([*cli, "--help"])}, args.runs
    )

    it_base, it_ours = medians(importtime["pass"]), medians(importtime["import nimpipe"])
    iw_base, iw_ours = medians(import_wall["pass"]), medians(import_wall["import"])
    hw_base, hw_ours = medians(help_wall["pass"]), medians(help_wall["help"])
    rows = [
        comparison_rows("-X importtime: all imports, us", it_base, it_ours, "all_imports_us", "us"),
        ["-X importtime: nimpipe (last line)", "-", f"{it_ours['last_line_us']:,.0f} us", "-", "-"],
        comparison_rows("wall: python -c 'import nimpipe'", iw_base, iw_ours, "wall_ms", "ms"),
        comparison_rows("wall: nimpipe --help", hw_base, hw_ours, "wall_ms", "ms"),
    ]
    print_table(
        f"Start-up, median of {args.runs} fresh processes (baseline: python -c pass)",
        ["figure", "baseline", "nimpipe", "added", "ratio"],
        rows,
    )

    loaded = json.loads(run([python, "-c", _CHECK_MODULES.format(heavy=HEAVY)], env)[1].stdout)
    print("\nHeavy modules in sys.modules (should all be 'no' after 'import nimpipe'):")
    for stage, present in loaded.items():
        shown = ", ".join(f"{m}: {'YES' if p else 'no'}" for m, p in present.items())
        print(f"  after {stage:<16} {shown}")
    clean = not any(loaded["import nimpipe"].values())
    print(
        f"\nSummary: import nimpipe adds {iw_ours['wall_ms'] - iw_base['wall_ms']:.0f} ms of wall "
        f"time ({it_ours['last_line_us'] / 1000:.1f} ms in its import tree under -X importtime); "
        f"nimpipe --help takes {hw_ours['wall_ms']:.0f} ms; heavy modules "
        f"{'stay out' if clean else 'ARE LOADED'}."
    )
    write_json(
        args.json,
        "startup",
        {
            "runs": args.runs,
            "importtime": {"baseline": it_base, "nimpipe": it_ours, "samples": importtime},
            "import_wall": {"baseline": iw_base, "nimpipe": iw_ours, "samples": import_wall},
            "help_wall": {"baseline": hw_base, "nimpipe": hw_ours, "samples": help_wall},
            "heavy_modules": loaded,
            "heavy_modules_stay_out": clean,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
