"""Errors a user can act on, defined once. A command prints one of these as one line (`error: ...`, exit 1, no
traceback); anything else raised under a command (torch's RuntimeError, a bug in ddpm_hf) is an internal error,
said to be one, with the line that asks for a report. Each class also derives from the builtin exception a caller
would catch (`except ValueError` still catches a UsageError). No heavy imports: the command lines import this.
"""


class UserError(Exception):
    """The base: the message names the problem and the fix."""


class UsageError(UserError, ValueError):
    """A flag, setting or input that cannot work as given."""


class MissingError(UserError, FileNotFoundError):
    """A file, folder, dataset or set of weights that the command was given or needs is not there."""


class StateError(UserError, RuntimeError):
    """What is on disk (a run folder, a checkpoint, a result folder) does not allow what was asked."""


class StopRequested(BaseException):
    """A signal asked a command to stop, where it stops at once: not an error (the command says so and exits with the
    signal's code, 128 + its number). A BaseException, as KeyboardInterrupt is: raised from a signal handler into any
    code, it must not be taken for that code's own failure by an `except Exception` (a bad image, a damaged file)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def is_user_error(error: BaseException) -> bool:
    """Ours (`UserError`), or what the operating system says of a path, a permission, the disk or the network
    (`OSError`, whose message names the file): both are the user's to act on."""
    return isinstance(error, (UserError, OSError))


def is_out_of_memory(error: BaseException) -> bool:
    """A CPU or GPU allocation that failed: Python's MemoryError, torch's OutOfMemoryError (a RuntimeError), or the
    CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception's message, its first line and at most `limit` characters (a library's multi-line message inside
    our one-line errors); its type's name where it has no message."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]
