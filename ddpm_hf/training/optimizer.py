"""The optimizer's part of a training run, in one place: Adam or AdamW (fused where torch has the kernel), the LR
schedule, settings changed on a resume, what a CUDA graph needs of them, and the optimizer's share of every step
(the step itself, skipped where the gradient is not finite; the gradients cleared; the schedule advanced)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ddpm_hf.choices import OPTIMIZERS
from ddpm_hf.errors import UsageError
from ddpm_hf.recipes.config import TrainingConfig

if TYPE_CHECKING:
    from ddpm_hf.training.state import Run


def optimizer_class(name: str):
    """--optimizer: Adam (the paper; weight decay added to the gradient, as L2) or AdamW (decoupled weight decay)."""
    if name == "adam":
        return torch.optim.Adam
    elif name == "adamw":
        return torch.optim.AdamW
    else:
        raise UsageError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}.")


def make_optimizer(config: TrainingConfig, parameters) -> tuple:
    """(Adam or AdamW, skips_on_device). Fused where torch has a fused kernel for the device (CUDA, CPU, ...): it then
    skips a step whose gradient is not finite on the device itself (`found_inf`). Elsewhere foreach, and the host
    decides the skip."""
    parameters = list(parameters)
    cls = optimizer_class(config.optimizer)
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    try:
        return cls(parameters, fused=True, **kwargs), True
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return cls(parameters, foreach=True, **kwargs), False


def make_lr_schedule(config: TrainingConfig, optimizer, total_steps: int):
    """--lr_scheduler over the run's `total_steps`, after --lr_warmup_steps (diffusers' schedules, stepped once per
    optimizer step)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps)


# the settings a checkpoint's optimizer state carries (its param groups, the LR schedule's base rates): a resume with
# --allow_config_change that changes one sets it there, or the change would be recorded and not applied
OPTIMIZER_SETTINGS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay")


def apply_optimizer_changes(config: TrainingConfig, optimizer, lr_scheduler, changed) -> None:
    """After a checkpoint's optimizer and LR schedule are restored: set the OPTIMIZER_SETTINGS among `changed` from
    `config` (the learning rate as the schedule's base rate, and the current rate from it)."""
    if not any(name in changed for name in OPTIMIZER_SETTINGS):
        return
    for group in optimizer.param_groups:
        group.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                     weight_decay=config.weight_decay, initial_lr=config.learning_rate)
    if "learning_rate" in changed:
        lr_scheduler.base_lrs = [config.learning_rate for _ in optimizer.param_groups]
        for group, rate in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
            group["lr"] = config.learning_rate * rate(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def hold_on_device(optimizer, device: torch.device, lr_on_device: bool, capturable: bool) -> None:
    """What a CUDA graph's replay needs of the optimizer: the learning rate in a device tensor (a replay reads it, and
    the LR schedule fills it in place) and capturable kernels."""
    for group in optimizer.param_groups:
        if lr_on_device:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        # fused Adam's kernels are the same; torch checks the flag in a capture (on a CPU the flag changes Adam's
        # rounding: a test of the graph's form there sets it as a capture would)
        group["capturable"] = capturable


def clear_gradients(optimizer) -> None:
    # to None, not zero: a CUDA graph's backward then writes them into its own memory
    optimizer.zero_grad(set_to_none=True)


def optimizer_step(run: Run, skipped: torch.Tensor) -> None:
    """Adam's step, unless `skipped` (a 0-d bool tensor on the device). With fp16, Accelerate's GradScaler
    finds the non-finite gradients and skips by itself."""
    inner = run.optimizer.optimizer
    if run.accelerator.scaler is not None:
        run.optimizer.step()
    elif run.skips_on_device:
        inner.found_inf = skipped.float()  # fused Adam leaves parameters and moments as they are where it is 1
        try:
            run.optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skipped):  # a host synchronisation, only for optimizers without a fused kernel here
        run.optimizer.step()


def end_step(run: Run, gradients: bool = True) -> None:
    """After a step's device work: its gradients cleared (unless a CUDA graph owns them: `gradients=False`) and the LR
    schedule advanced, which sets the next step's rate (in place where the rate is a device tensor)."""
    if gradients:
        clear_gradients(run.optimizer)
    run.lr_scheduler.step()
