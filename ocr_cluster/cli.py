"""`ocr-cluster`: train | eval | sweep | results | data | models.

Errors are one line on stderr and a non-zero exit (the classes are in ocr_cluster/errors.py): 2 for
bad input (a UserInputError: config, arguments, URLs, ...), 3 for a verb whose capability is not in
this version yet (NotAvailable), 1 for anything else. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ocr_cluster import __version__
from ocr_cluster.errors import NotAvailable, ReportedFailure, UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from ocr_cluster.config import Config

EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NOT_AVAILABLE = 1, 2, 3

# Verbs with actions: verb -> (help, commands module). A commands module has HELP (action -> help) and
# add_arguments(action, parser), which adds the action's arguments and its handler (set_defaults(func=...)).
# It is imported only when the command line names its verb (it may import pyarrow, torch, ...).
ACTION_VERBS = {
    "sweep": ("launch and follow an ablation grid on SLURM or Ray Tune", "ocr_cluster.sweep.commands"),
    "results": ("query the results store", "ocr_cluster.results.commands"),
    "data": ("make, convert and inspect sharded datasets", "ocr_cluster.data.commands"),
    "models": ("the model zoo", "ocr_cluster.models.commands"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Verbs(argparse._SubParsersAction):
    """The verbs' subparsers; a verb's actions are added when the command line names that verb."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unwired: dict[str, Callable[[], None]] = {}  # verb -> adds its actions

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        wire = self.unwired.pop(values[0], None) if values else None
        if wire is not None:
            wire()
        super().__call__(parser, namespace, values, option_string)


def _add_actions(verb: argparse.ArgumentParser, module: str, common: argparse.ArgumentParser) -> None:
    commands = importlib.import_module(module)
    actions = verb.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    for action, help_text in commands.HELP.items():
        commands.add_arguments(action, actions.add_parser(action, parents=[common], help=help_text,
                                                          description=help_text))


def _lazy(module: str, name: str):
    """A handler imported when it runs, so `--help` and config errors stay fast."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)
    return run


# ---------------------------------------------------------------------------------------------
# train


def _load_config(args: argparse.Namespace) -> Config:
    from ocr_cluster import config  # yaml, dataclasses: not needed for --help

    return config.load(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if args.print_config or args.print_run_id:
        from ocr_cluster.config import resolve_dataset

        cfg = resolve_dataset(cfg)  # the run id the driver will use names the dataset (its manifest)
    if args.print_config:
        from ocr_cluster.storage import redact

        print(f"# run_id: {cfg.run_id}")
        print(redact(cfg.to_yaml()), end="")  # no URL userinfo (KEY:SECRET@) on screen
        return 0
    if args.print_run_id:
        print(cfg.run_id)
        return 0
    if args.verbose:
        from ocr_cluster import logs

        logs.set_verbose()
    from ocr_cluster.train.driver import run

    return run(cfg)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="job YAML (jobs/<name>.yaml); omitted = the embedded default job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set data.batch_size=16 (repeatable)")


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")

    parser = _Parser(prog="ocr-cluster", parents=[common],
                     description="Train and sweep OCRNet semantic segmentation on Ray and SLURM clusters.")
    parser.add_argument("--version", action="version", version=f"ocr_cluster {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser,
                                  action=_Verbs)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, parents=[common], help=help_text, description=help_text)

    train = verb("train", "train one job on Ray Train (same as python -m ocr_cluster.train)")
    _add_config_args(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (YAML, with its run id) and exit; reads the dataset's manifest")
    train.add_argument("--print-run-id", action="store_true",
                       help="print the deterministic run id and exit; reads the dataset's manifest")
    train.add_argument("--verbose", action="store_true",
                       help="show Ray's own log lines too (the same as OCR_CLUSTER_VERBOSE=1)")
    train.set_defaults(func=cmd_train)

    evaluate = verb("eval", "evaluate a checkpoint (mIoU, per-class IoU)")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint URI (any fsspec URL)")
    evaluate.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test")
    evaluate.add_argument("--mode", choices=("whole", "slide"), default=None, help="inference mode")
    evaluate.set_defaults(func=_lazy("ocr_cluster.train.evaluate", "cmd_eval"))

    for name, (help_text, module) in ACTION_VERBS.items():
        verbs.unwired[name] = functools.partial(_add_actions, verb(name, help_text), module, common)
    return parser


def main(argv: list[str] | None = None, prog: str = "ocr-cluster") -> int:
    parser = build_parser()
    parser.prog = prog
    args = parser.parse_args(argv)
    # `python -m ocr_cluster.train` names itself; `ocr-cluster` names the verb and action too.
    args.prog = prog if prog != "ocr-cluster" else " ".join(
        p for p in (prog, args.verb, getattr(args, "action", None)) if p)
    debug = getattr(args, "debug", False)
    try:
        return args.func(args) or 0
    except NotAvailable as exc:
        print(f"{args.prog}: {exc}", file=sys.stderr)
        return EXIT_NOT_AVAILABLE
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns failures into one line
        if debug:
            raise
        if isinstance(exc, (UserInputError, ReportedFailure)):  # one line already, the cause named
            print(f"{args.prog}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT if isinstance(exc, UserInputError) else EXIT_ERROR
        print(f"{args.prog}: error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
