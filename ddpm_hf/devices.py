"""Which device a command or a run uses: one way to ask, for every command and the training loop."""

from __future__ import annotations

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
