"""The CLI's one error path: every expected failure is one `error:` line and exit 2 (click's own usage errors
included); anything else one line naming it as a bug, exit 3; the traceback only under --debug or
SPECCOMPILE_DEBUG=1. Ctrl-C exits 130; an output closed by its reader (`| head`) ends quietly, as Unix tools do.
A warning is one `warning:` line."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import traceback
import warnings

import click

from speccompile.errors import SpeccompileError


DEBUG_ENV = "SPECCOMPILE_DEBUG"
# click >= 8.2 raises this usage error for a group run without a command; its message is the whole help text
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
REPORT_HINT = ("this is a bug in speccompile: please report it with the command you ran "
               f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)")


def _debugging() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str, status: int) -> None:
    if _debugging():
        traceback.print_exc()
    click.echo(f"error: {' '.join(str(message).split())}", err=True)  # one line, whatever the message holds
    sys.exit(status)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


@contextlib.contextmanager
def one_line_warnings():
    """Each warning as one `warning:` line on stderr, as each failure is one `error:` line; Python's own form
    names a file and line inside speccompile and prints that line of its source, which tells a user nothing."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        yield


def _output_closed() -> None:
    """The reader of stdout went away (`speccompile generate ... | head`): end quietly with the status of a
    process SIGPIPE ends, as Unix tools do. Python ignores SIGPIPE (which sockets rely on), so the write raised
    BrokenPipeError instead; stdout now points at /dev/null, so that the interpreter's last flush cannot fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (replaced, or closed): nothing to flush
        pass
    sys.exit(128 + signal.SIGPIPE)


def _expected_failure(e: Exception) -> str | None:
    """The message of a failure that bad input explains (printed as one `error:` line, exit 2), or None for one
    that only a bug explains."""
    if isinstance(e, SpeccompileError):
        return e.cli_message()  # options named as flags, not as the Python API's keywords
    if isinstance(e, OSError):  # a path that is missing, unreadable, a full disk
        return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    if isinstance(e, (ValueError, RecursionError)):  # bad parameters reaching the runtime, bad JSON
        return str(e) or type(e).__name__
    if type(e).__module__.startswith("onnxruntime"):  # its load and run errors share no base class
        return f"onnxruntime: {e}"
    return None


def _check_text_arguments() -> None:
    """A text argument that is not valid UTF-8 reaches Python with surrogate escapes (bytes it could not decode);
    refuse it here rather than deep in the tokenizer. Paths may hold any bytes and are not checked."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(param.type, click.Path):
            continue
        for v in values:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise SpeccompileError(f"{param.human_readable_name} is not valid UTF-8 text (bytes the "
                                           "terminal could not decode); pass it as UTF-8") from None


def errors_to_exit(fn):
    """A command whose text arguments are checked and whose failures go through one_line_errors."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        _check_text_arguments()
        return fn(*args, **kwargs)
    return one_line_errors(checked)


def one_line_errors(fn):
    """Every expected failure: one `error:` line and exit 2. Anything else: one line naming it as a bug with a
    hint to report it, exit 3. The traceback only under --debug or SPECCOMPILE_DEBUG=1. For the commands, and for
    the tools in tools/ (their main)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit):
            raise  # usage errors: click prints them (exit 2)
        except BrokenPipeError:
            _output_closed()
        except Exception as e:
            message = _expected_failure(e)
            if message is None:
                _fail(f"internal error ({type(e).__name__}: {str(e)[:300]}); {REPORT_HINT}", 3)
            _fail(message, 2)
    return wrapper


class OneLineUsageErrors(click.Group):
    """click's own usage errors (a value of the wrong type, a missing argument, an unknown option) as the same one
    `error:` line and exit 2 as every other bad input, instead of click's usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            with one_line_warnings():
                status = super().main(*args, standalone_mode=False, **kwargs)
        except NO_ARGS_IS_HELP as e:  # `speccompile` alone: the help as click lays it out, not folded into one line
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.UsageError as e:
            hint = f" (see: {e.ctx.command_path} --help)" if e.ctx else ""
            _fail(f"{e.format_message()}{hint}", 2)
        except click.exceptions.ClickException as e:
            _fail(e.format_message(), e.exit_code or 2)
        except click.exceptions.Abort:  # Ctrl-C (or end of input at a prompt): 128 + SIGINT, as shells report it
            _fail("aborted", 128 + signal.SIGINT)
        sys.exit(status or 0)
