"""One argument parse and one ``main`` for every command.

``cpsd pipeline`` and ``python -m workflows.pipeline`` are one command, and so are ``study`` and
``tune``: each is a :class:`Job`, declared once (:func:`add_job_args`) on either parser. Every
command that reads a config declares ``--config``/``--set`` through :func:`add_config_args` and
gets the loaded :class:`~workflows.config.Config` (:func:`with_config`), never argv.

:func:`run_command` runs a parsed command: a user error (:data:`~workflows.config.USER_ERRORS`,
:class:`UsageError`) prints one line and exits 2, Ctrl-C exits 130, both prefixed with the
command's label (``cpsd``, ``pipeline``, ...).

This module imports neither torch, Ray nor MLflow, so that ``cpsd --help`` and a mistyped
argument answer at once.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mlcore.configlib import ConfigWarning
from workflows.config import USER_ERRORS, Config, config_path, load_config

# What a command does with its parsed arguments; None means exit 0.
Command = Callable[[argparse.Namespace], int | None]
ConfigCommand = Callable[[Config, argparse.Namespace], int | None]


class UsageError(Exception):
    """A user error to report without a traceback."""


@dataclass(frozen=True)
class Job:
    """A Ray job that is both ``cpsd NAME`` and ``python -m workflows.NAME``."""

    name: str
    """The module under ``workflows``, and the label of its error lines."""
    description: str
    """What ``python -m workflows.NAME --help`` says first."""
    default_config: str
    """The bundled config used without ``--config``."""
    interrupted: str
    """What Ctrl-C leaves behind, after ``NAME: interrupted``."""
    stages: bool = True
    """Reuses finished stages, so it takes ``--retrain-stale``."""
    options: Callable[[argparse.ArgumentParser], None] | None = None
    """Declares the job's own arguments."""


def _tune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--out", help="where best_loss.yaml, results.csv and sweep.png go")


PIPELINE = Job(
    name="pipeline",
    description="Run the CPSD pipeline on Ray.",
    default_config="tiny",
    interrupted="checkpoints kept, MLflow runs marked KILLED",
)
STUDY = Job(
    name="study",
    description="Run an ablation study on Ray.",
    default_config="study_cpsd_tiny",
    interrupted="checkpoints kept, MLflow runs marked KILLED",
)
TUNE = Job(
    name="tune",
    description="Run a Ray Tune loss sweep.",
    default_config="tune_asl_tiny",
    interrupted="resume with --resume",
    stages=False,
    options=_tune_options,
)


def add_config_args(parser: argparse.ArgumentParser, default: str, *, stages: bool = False) -> None:
    """``--config``, ``--verbose`` and ``--set`` (with ``stages``: ``--retrain-stale``)."""
    parser.add_argument(
        "--config",
        default=default,
        help=f"YAML config file, or the name of a bundled one (e.g. tiny) (default: {default})",
    )
    parser.add_argument(
        "--verbose",
        action="store_const",
        const="verbose=true",
        help="show every worker's output and third-party INFO logs (= --set verbose=true)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    if stages:
        parser.add_argument(
            "--retrain-stale",
            action="store_const",
            const="stale=retrain",
            dest="retrain_stale",
            help="retrain finished stages made by other code (= --set stale=retrain)",
        )


def config_from_args(args: argparse.Namespace) -> Config:
    """The config named by parsed ``--config``/``--set`` (and the flags that are overrides)."""
    flags = [getattr(args, "retrain_stale", None), args.verbose]
    return load_config(config_path(args.config), [*args.overrides, *filter(None, flags)])


def with_config(command: ConfigCommand) -> Command:
    """The command run with the config its arguments name, loaded when it runs (a bad config
    is a user error like any other)."""
    return lambda args: command(config_from_args(args), args)


def add_job_args(
    parser: argparse.ArgumentParser, job: Job, *, default_config: str | None = None
) -> None:
    """Declare ``job``'s arguments and error label on ``parser`` (``cpsd``'s or its own)."""
    add_config_args(parser, default_config or job.default_config, stages=job.stages)
    if job.options is not None:
        job.options(parser)
    parser.set_defaults(label=job.name, interrupted=job.interrupted)


def job_main(job: Job, command: ConfigCommand, argv: Sequence[str] | None = None) -> int:
    """``python -m workflows.<job>``: the same arguments and outcome as ``cpsd <job>``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m workflows.{job.name}", description=job.description
    )
    add_job_args(parser, job)
    parser.set_defaults(func=with_config(command))
    return run_command(parser.parse_args(argv))


def user_message(err: BaseException) -> str:
    """A user error's one line; an error raised inside a Ray task carries the task's
    traceback in its text, so its cause is printed instead."""
    cause = getattr(err, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_PYTHON_FORMAT = warnings.formatwarning  # taken once: each command installs its own label


def show_config_warnings_as_lines(label: str) -> None:
    """Print a config warning (a deprecated layout, an unused section) as one line,
    ``<label>: warning: ...``, once per message; other warnings keep Python's format."""

    def one_line(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, ConfigWarning):
            return f"{label}: warning: {message}\n"
        return _PYTHON_FORMAT(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    warnings.filterwarnings("once", category=ConfigWarning)


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func``; user errors and Ctrl-C become one line on stderr, prefixed with
    ``args.label``, and exit 2 or 130 (``args.interrupted`` says what an interrupt kept)."""
    label = args.label
    show_config_warnings_as_lines(label)
    try:
        return args.func(args) or 0
    except (*USER_ERRORS, UsageError) as err:
        print(f"{label}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"; {args.interrupted}" if args.interrupted else ""
        print(f"{label}: interrupted{kept}", file=sys.stderr)
        return 130
