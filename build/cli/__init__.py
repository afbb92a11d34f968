"""The ``edgebuild`` command line.

Every domain error becomes a one-line message on stderr and its exit code here, and only here.
"""
from __future__ import annotations

import logging
import sys

import click

from edgebuild.core import __version__
from edgebuild.core.errors import EXIT_CODE_HELP, EdgebuildError, ExitCode

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {int(c):>3}  {text}" for c, text in EXIT_CODE_HELP.items())


def exit_code_table() -> str:
    """The README's exit-code table (Markdown), from ``EXIT_CODE_HELP``."""
    rows = [f"| {int(code)} | {text} |" for code, text in EXIT_CODE_HELP.items()]
    return "\n".join(["| code | meaning |", "|---|---|", *rows]) + "\n"


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="edgebuild")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output: only results, warnings and errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, verbose, quiet, debug):
    """Compress a language model in stages, validate each stage on an edge device, ship the best.

    \b
    Quick start:
      edgebuild model fetch smollm2-135m
      edgebuild all --model smollm2-135m --target local --data-dir DATA

    \b
    Progress goes to stderr: bars on a terminal; elsewhere (CI, a pipe) a line when each step
    starts and ends and a heartbeat line every 30 s ($EDGEBUILD_HEARTBEAT_S) during long steps.
    Results (tables, --json) go to stdout, and only they do.
    """
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose cannot be used together")
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        _quiet_libraries()
    ctx.obj = {"debug": debug, "progress": "quiet" if quiet else "auto"}


def _quiet_libraries() -> None:
    """Our own progress display replaces the libraries' bars and chatter."""
    import os
    for var in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _register() -> None:
    from edgebuild.build.cli import (
        build_cmds, cache_cmds, config_cmds, measure_cmds, model_cmds, release_cmds, target_cmds,
    )
    for module in (build_cmds, cache_cmds, config_cmds, measure_cmds, model_cmds, release_cmds, target_cmds):
        module.register(cli)


_register()


def main(argv=None) -> int:
    """Entry point: run the CLI and map errors to exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="edgebuild", standalone_mode=False)
    except EdgebuildError as e:
        if debug:
            raise
        click.echo(f"error: {e.one_line()}", err=True)
        return int(e.exit_code)
    except click.exceptions.Abort as e:    # click turns Ctrl-C into Abort
        interrupted = isinstance(e.__cause__, KeyboardInterrupt)
        click.echo("interrupted; finished steps are kept in the cache" if interrupted else "aborted", err=True)
        return int(ExitCode.INTERRUPTED)
    except click.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        return e.exit_code
    except click.ClickException as e:       # e.g. a file option click could not open
        click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        return int(ExitCode.USAGE)
    except KeyboardInterrupt:
        click.echo("interrupted; finished steps are kept in the cache", err=True)
        return int(ExitCode.INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the one place that turns bugs into an exit code
        if debug:
            raise
        click.echo(f"internal error: {_bug_line(e)} (a bug; rerun with --debug for the traceback)",
                   err=True)
        return int(ExitCode.INTERNAL)
    return int(rv or 0)


def _bug_line(err: BaseException) -> str:
    """``Type: message at file:line`` of an unexpected exception, on one line."""
    import traceback
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    message = " ".join(str(err).split())[:300]
    return f"{type(err).__name__}: {message}{where}" if message else f"{type(err).__name__}{where}"
