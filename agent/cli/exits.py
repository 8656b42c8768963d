"""The exit codes of every ``edgeserve`` command, and the one table that picks them.

    0    success (``status``: healthy)
    1    the operation failed (a model failed to load, an inference call was refused;
         ``status``: degraded)
    2    usage, configuration, archive or input-file error
    3    the daemon is not reachable
    130  interrupted (Ctrl-C)
    141  stdout closed by its reader (``edgeserve models list | head -1``), quietly

Library errors reach ``main`` as exceptions; ``exit_code_for`` maps each to its code and
``main`` prints one line, never a traceback.
"""

from __future__ import annotations

import enum

from edgeserve.errors import ArchiveError, ConfigError, EdgeserveError, InvalidArgument


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a reader that went away


EPILOG = """exit codes: 0 success, 1 operation failed, 2 usage/config/archive error,
3 daemon not reachable"""


class UsageError(Exception):
    """Bad command-line input; exits with ``ExitCode.USAGE``."""


class DaemonUnreachable(ConnectionError):
    """The daemon did not answer; exits with ``ExitCode.UNREACHABLE``."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, UsageError | ConfigError | ArchiveError | InvalidArgument):
        return ExitCode.USAGE
    if isinstance(exc, ConnectionError):
        return ExitCode.UNREACHABLE
    return ExitCode.FAILED


def describe(exc: BaseException) -> str:
    """One line for stderr: the library's own message, or what the OS said about which file."""
    if isinstance(exc, EdgeserveError | UsageError | ConnectionError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"unexpected {type(exc).__name__}: {exc}"
