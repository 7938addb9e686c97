"""Which device a command or a run uses: one way to ask, for every command and the training loop."""

from __future__ import annotations

import contextlib
import os

import torch


def accelerator_available() -> bool:
    """Whether torch sees a GPU or other accelerator. Without one, Accelerate must be told `cpu=True`,
    or several processes (torchrun / `accelerate launch --multi_gpu`) do not form a gloo group."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a non-oneDNN build: assume it has
        return True


def device_name(device: torch.device) -> str:
    """The model name of a device, as a user would compare runs by it: the GPU's, or the CPU's from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def distributed_state():
    """Accelerate's PartialState of this process (one process, or one of `accelerate launch`): its `device` is the
    device a command runs on."""
    from accelerate import PartialState

    return PartialState(cpu=not accelerator_available())


@contextlib.contextmanager
def deterministic_kernels(on: bool):
    """With `on`: torch's deterministic kernels where it has them (a warning names an op that has none) and no cuDNN
    autotuning, as before afterwards. GPUs need it for bit-exact reruns: cuDNN's and atomics-based backward kernels
    sum in an order that varies. cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its first call, so it is set here if unset."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


# bf16 is taken on a CPU only when its step measured at least this much faster: the probe's few steps are noisy (±15%
# between processes on one 2-core machine), a smaller gain did not survive into the real loop there, and fp32 is the
# exact one of the two
BF16_MIN_GAIN = 1.10


def rates_text(rates: dict) -> str:
    """`fp32 N images/s, bf16 M images/s`: what --mixed_precision auto measured, for the log and the card."""
    return ", ".join(f"{'fp32' if precision == 'no' else precision} {rate:.0f} images/s" for precision, rate in rates.items())
