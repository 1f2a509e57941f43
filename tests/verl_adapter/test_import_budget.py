"""`import verl` with our plugin costs (almost) what it costs without it (issue 14, item 3).

veRL loads its plugins in every process it starts: vLLM servers, agent-loop and reward workers, the
TaskRunner. Each measurement runs in a fresh interpreter; the baseline is veRL's own switch
``VERL_USE_EXTERNAL_PLUGINS=none``. Budget: at most 150 more modules and 30 MB more RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MAX_EXTRA_MODULES = 150
MAX_EXTRA_RSS_MB = 30.0

# The modules whose import registers our lazy components, and the engines: none may be loaded by the plugin.
HEAVY = (
    "verl.trainer.ppo.core_algos",
    "verl.trainer.ppo.v1",
    "verl.trainer.ppo.v1.trainer_base",
    "verl.experimental.agent_loop",
    "verl.experimental.reward_loop.reward_manager",
    "verl.workers.rollout.replica",
    "verl.workers.engine",
    "verl.workers.engine_workers",
)

PROBE = """
import json, resource, sys, time
start = time.perf_counter()
import verl
seconds = time.perf_counter() - start
rss_kb = next(int(row.split()[1]) for row in open("/proc/self/status") if row.startswith("VmRSS:"))
from verl.plugin.platform import platform_manager
print(json.dumps({
    "modules": len(sys.modules),
    "rss_mb": rss_kb / 1024,
    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "seconds": seconds,
    "plugin": "verl_selflock.verl_adapter.plugin" in sys.modules,
    "heavy": [name for name in HEAVY if name in sys.modules],
    "platform_resolved": platform_manager._current_platform is not None,
}))
"""


def measure(policy: str) -> dict:
    """``import verl`` in a fresh interpreter with ``VERL_USE_EXTERNAL_PLUGINS=policy``."""
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM")}
    env["VERL_USE_EXTERNAL_PLUGINS"] = policy
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter imports veRL (~10 s)
def test_import_verl_with_the_plugin_stays_within_budget():
    without, with_plugin = measure("none"), measure("auto")
    extra_modules = with_plugin["modules"] - without["modules"]
    extra_rss = with_plugin["rss_mb"] - without["rss_mb"]
    print(
        f"\nimport verl: {without['modules']} -> {with_plugin['modules']} modules (+{extra_modules}), "
        f"{without['rss_mb']:.0f} -> {with_plugin['rss_mb']:.0f} MB RSS (+{extra_rss:.1f}), "
        f"{without['seconds']:.2f} -> {with_plugin['seconds']:.2f} s"
    )
    assert not without["plugin"] and with_plugin["plugin"]
    added = sorted(set(with_plugin["heavy"]) - set(without["heavy"]))
    assert added == [], f"the plugin imported veRL's trainer / engines / loops: {added}"
    assert extra_modules <= MAX_EXTRA_MODULES, (without["modules"], with_plugin["modules"])
    assert extra_rss <= MAX_EXTRA_RSS_MB, (without["rss_mb"], with_plugin["rss_mb"])


@pytest.mark.slow  # a fresh interpreter imports veRL (~10 s)
def test_import_verl_leaves_the_platform_unresolved():
    """A vendor platform plugin loaded after ours must still be auto-detected: nobody resolves the
    platform singleton while ``import verl`` loads the plugins."""
    assert measure("auto")["platform_resolved"] is False
