"""`ocr-cluster`: train | eval | sweep | results | data | models.

Errors are one line on stderr and a non-zero exit: 2 for bad input (config, arguments, URLs),
3 for a verb whose capability is not in this version yet, 1 for anything else. `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ocr_cluster import __version__, config, logs
from ocr_cluster.storage import StorageError

EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NOT_AVAILABLE = 1, 2, 3


class UserError(Exception):
    """Bad input found outside config parsing; the message is one line for the user."""


class NotAvailable(Exception):
    """The verb's capability has not landed in this version."""


# Errors raised for bad input by the capability packages (ValueError subclasses, one-line messages).
# Looked up only in modules already imported: a module that raised one has been imported.
BAD_INPUT_ERRORS = (
    ("ocr_cluster.results.errors", "ResultsError"),
    ("ocr_cluster.data.errors", "DataError"),
    ("ocr_cluster.models.convert", "CheckpointError"),
    ("ocr_cluster.train.driver", "TrainSetupError"),
)


def _is_bad_input(exc: BaseException) -> bool:
    types = [config.ConfigError, StorageError, UserError]
    for module, name in BAD_INPUT_ERRORS:
        if module in sys.modules and hasattr(sys.modules[module], name):
            types.append(getattr(sys.modules[module], name))
    return isinstance(exc, tuple(types))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _not_available(capability: str):
    def run(args: argparse.Namespace) -> int:
        raise NotAvailable(f"not available in ocr_cluster {__version__}: "
                           f"the {capability} capability has not landed yet")
    return run


def _lazy(module: str, name: str):
    """A handler imported when it runs, so `--help` and config errors stay fast."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)
    return run


# ---------------------------------------------------------------------------------------------
# train


def _load_config(args: argparse.Namespace) -> config.Config:
    return config.load(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if args.print_config:
        print(f"# run_id: {cfg.run_id}")
        print(cfg.to_yaml(), end="")
        return 0
    if args.print_run_id:
        print(cfg.run_id)
        return 0
    if args.verbose:
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
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, parents=[common], help=help_text, description=help_text)

    train = verb("train", "train one job on Ray Train (same as python -m ocr_cluster.train)")
    _add_config_args(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (YAML, with its run id) and exit")
    train.add_argument("--print-run-id", action="store_true", help="print the deterministic run id and exit")
    train.add_argument("--verbose", action="store_true",
                       help="show Ray's own log lines too (the same as OCR_CLUSTER_VERBOSE=1)")
    train.set_defaults(func=cmd_train)

    evaluate = verb("eval", "evaluate a checkpoint (mIoU, per-class IoU)")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint URI (any fsspec URL)")
    evaluate.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test")
    evaluate.add_argument("--mode", choices=("whole", "slide"), default=None, help="inference mode")
    evaluate.set_defaults(func=_lazy("ocr_cluster.train.evaluate", "cmd_eval"))

    def group(name: str, help_text: str, actions: dict[str, tuple[str, list[tuple[str, dict]]]],
              capability: str) -> None:
        sub = verb(name, help_text).add_subparsers(dest="action", metavar="ACTION", required=True,
                                                   parser_class=_Parser)
        for action, (action_help, arguments) in actions.items():
            p = sub.add_parser(action, parents=[common], help=action_help, description=action_help)
            for flag, kwargs in arguments:
                p.add_argument(flag, **kwargs)
            p.set_defaults(func=_not_available(capability))

    def wire(name: str, help_text: str, module: str, actions: dict[str, str] | None = None) -> None:
        """A verb whose capability has landed: `module` has add_arguments(action, parser), the actions'
        help as HELP (or `actions` here) and a handler cmd_<action> (unless add_arguments sets one)."""
        commands = importlib.import_module(module)
        sub = verb(name, help_text).add_subparsers(dest="action", metavar="ACTION", required=True,
                                                   parser_class=_Parser)
        for action, action_help in (actions or commands.HELP).items():
            p = sub.add_parser(action, parents=[common], help=action_help, description=action_help)
            commands.add_arguments(action, p)
            if p.get_default("func") is None:
                p.set_defaults(func=getattr(commands, f"cmd_{action}"))

    group("sweep", "launch and follow an ablation grid on SLURM or Ray Tune", {
        "plan": ("list the cells of a grid and their run ids", [("grid", {"help": "sweeps/<grid>.yaml"})]),
        "launch": ("submit every missing cell of a grid", [("grid", {"help": "sweeps/<grid>.yaml"})]),
        "status": ("show the state of each cell", [("grid", {"help": "sweeps/<grid>.yaml"})]),
    }, "sweep")
    wire("results", "query the results store", "ocr_cluster.results.commands")
    wire("data", "make, convert and inspect sharded datasets", "ocr_cluster.data.commands", {
        "convert": "convert an official dataset layout to Parquet shards",
        "synth": "write a learnable synthetic dataset",
        "inspect": "counts per split, class pixel histogram, image sizes, shard sizes",
    })
    wire("models", "the model zoo", "ocr_cluster.models.commands")
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
        if _is_bad_input(exc):
            print(f"{args.prog}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if type(exc).__name__ == "TrainFailed":  # already one line, the cause named
            print(f"{args.prog}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        print(f"{args.prog}: error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
