"""What every command shares: the one-line error wrapper, logging, and loading a pipeline.

Every command reports an error as one line on stderr (`error: ...`), exits 1 (2 for a usage error) and shows no
traceback: `--debug` or DDPM_HF_DEBUG=1 shows it. Under `accelerate launch` a message that several processes
share is printed once. Parsing needs no torch, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional, Sequence

from ddpm_hf import cpu_threads
from ddpm_hf.commands.parsing import DEBUG_ENV, emit_error
from ddpm_hf.errors import StopRequested, first_line, is_out_of_memory, is_user_error

# what a command that ran out of memory says, unless it names its own flags
MEMORY_HINT = "lower --batch_size"


def command(main=None, *, memory_hint: str = MEMORY_HINT):
    """Run `main(argv)`; report any exception as one line (the traceback with --debug or DDPM_HF_DEBUG=1): a
    `UserError` or the system's `OSError` as it is, running out of memory with `memory_hint`, anything else as an
    internal error that asks for a report."""
    if main is None:
        return functools.partial(command, memory_hint=memory_hint)

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        problem = cpu_threads.threads_problem(os.environ)
        if problem:
            emit_error(problem)
            return 2
        cpu_threads.apply()  # first: the OpenMP runtime reads its policy once, when torch loads it
        try:
            return main([a for a in argv if a != "--debug"])
        except StopRequested as e:
            emit_error(str(e), prefix="stopped")
            return e.exit_code
        except KeyboardInterrupt:
            emit_error("interrupted")
            return 130
        except Exception as e:
            if getattr(e, "exit_code", None) is not None:  # a run stopped on request (a signal): not an error
                emit_error(str(e), prefix="stopped")
                return e.exit_code
            if debug:
                raise
            if is_out_of_memory(e):
                emit_error(f"out of memory ({first_line(e)[:160]}); {memory_hint}")
            elif is_user_error(e):
                emit_error(str(e) or type(e).__name__)
            else:
                emit_error(f"internal error ({type(e).__name__}: {e}); run again with --debug for the traceback and "
                           "report it, please")
            return 1
        finally:
            end_process_group()

    return wrapper


def end_process_group() -> None:
    """Under `accelerate launch`, end the processes' group once, as the command exits (not after each training run:
    ddpm-distill runs several in the same processes). Without torch loaded there is none to end."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def configure_logging() -> None:
    """INFO lines with time and source on stderr; no line per HTTP request (huggingface_hub's client logs each)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def quiet_loading() -> None:
    """No progress bar for loading a pipeline's two components: commands show their own progress."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def load_for_command(source: str, device):
    """The pipeline a command works on, on `device`, without diffusers' loading bars."""
    from ddpm_hf.saved.weights import load_pipeline

    quiet_loading()
    return load_pipeline(source).to(device)
