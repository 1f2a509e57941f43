"""Cost of our plugin on ``import verl``: modules, RSS and time, with and without it (issue 14, item 3).

veRL loads its ``verl.plugins`` entry points on ``import verl`` in every process it starts (vLLM
servers, agent-loop and reward workers, the TaskRunner), so whatever the plugin imports is paid
many times per run. Each sample is a fresh interpreter; "without" is veRL's own switch
``VERL_USE_EXTERNAL_PLUGINS=none``. Samples alternate so that machine load hits both alike; medians.
``--lazy`` also reports what registering every lazy component costs on top (what the TaskRunner,
which imports veRL's trainer anyway, ends up paying).

    python benchmarks/bench_import.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = """
import json, resource, sys, time
start = time.perf_counter()
import verl
seconds = time.perf_counter() - start
if LAZY:
    from verl_selflock.verl_adapter import plugin
    plugin.register_all_now()
    seconds = time.perf_counter() - start
rss_kb = next(int(row.split()[1]) for row in open("/proc/self/status") if row.startswith("VmRSS:"))
print(json.dumps({"modules": len(sys.modules), "rss_mb": rss_kb / 1024,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}))
"""


def sample(policy: str, lazy: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM")}
    env["VERL_USE_EXTERNAL_PLUGINS"] = policy
    code = f"LAZY = {lazy!r}\n{PROBE}"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=600
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh interpreters per variant")
    parser.add_argument("--lazy", action="store_true", help="also time registering every lazy component")
    args = parser.parse_args()

    variants = {"without plugin": ("none", False), "with plugin": ("auto", False)}
    if args.lazy:
        variants["with plugin + all lazy names"] = ("auto", True)
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (policy, lazy) in variants.items():
            rows[name].append(sample(policy, lazy))

    base = rows["without plugin"]
    print(f"import verl, median of {args.repeats} fresh interpreters each ({sys.executable})")
    print(f"{'variant':<30}{'modules':>9}{'ratio':>8}{'RSS MB':>9}{'ratio':>8}{'seconds':>9}{'ratio':>8}")
    for name, samples in rows.items():
        cells = []
        for key, fmt in (("modules", "{:9.0f}"), ("rss_mb", "{:9.0f}"), ("seconds", "{:9.2f}")):
            value = median(samples, key)
            cells.append(fmt.format(value) + f"{value / median(base, key):7.2f}x")
        print(f"{name:<30}" + "".join(cells))
    extra_modules = median(rows["with plugin"], "modules") - median(base, "modules")
    extra_rss = median(rows["with plugin"], "rss_mb") - median(base, "rss_mb")
    print(f"plugin adds {extra_modules:+.0f} modules (budget +150) and {extra_rss:+.1f} MB RSS (budget +30)")


if __name__ == "__main__":
    main()
