"""The training loop (Algorithm 1 of the paper) on Accelerate: one process or many, CPU or GPUs.

`train(config)` runs four stages, each a function below:

1. `setup`: the accelerator, the Hub check (first: a bad token fails in seconds), the data, the model,
   the diffusion, the loss, the optimizer, the LR schedule and the EMA (a `Run`);
2. `resume`: the checkpoint asked for, if any, into a `TrainState` (the one object a checkpoint saves);
3. `run_loop`: for each step, `run_step` (its `device_step`, steps.py: Algorithm 1 over the micro-batches with
   `forward_backward`, then clipping, the optimizer, the EMA; replayed as a CUDA graph where it can be, see
   step_graph.py) and `periodic_work` (log, checkpoint, grid, evaluation, push);
4. `finish`: the pipeline with the EMA weights, the summary, the model card, the final push.

Determinism: everything random in step k (the batch, flips, noise, timesteps, dropout) is drawn from
generators seeded by (seed, k, rank), and the data order of epoch e is a permutation seeded by
(seed, e). A run resumed from checkpoint k therefore continues exactly as the uninterrupted run.

Batch size: `batch_size` images per optimizer step in total, split evenly over processes and
gradient-accumulation micro-batches; steps count optimizer steps.

No host synchronisation in a step: the per-timestep tables live on the device, a step whose gradient is not
finite is skipped by the optimizer itself (fused Adam's `found_inf`: the gradient norm is taken after the
all-reduce, so every process agrees), and the loss sums and non-finite counters are device tensors that
are read on logging and checkpoint steps only.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from accelerate.logging import get_logger

from ddpm_hf import cpu_threads
from ddpm_hf.training.batches import BatchSource
from ddpm_hf.sizes import size_of
from ddpm_hf.devices import accelerator_available, cpu_has_bf16, deterministic_kernels, device_name
from ddpm_hf.errors import StateError, UsageError
from ddpm_hf.outputs.files import atomic_write_json, remove_atomically, remove_stale_temporaries
from ddpm_hf.publishing.model_card import write_model_card
from ddpm_hf.outputs.plots import plot_loss_curve
from ddpm_hf.outputs.run_folder import (
    BEST_CHECKPOINT,
    CHECKPOINT_PREFIX,
    CHECKPOINT_UNET_CONFIG,
    LOGS_DIR,
    LOSS_CURVE,
    RUN_PRODUCTS,
    SAMPLE_GRIDS_DIR,
    TRAIN_SUMMARY,
    TRAINING_CONFIG,
    EMA_SWEEP_PLOT,
    POSTHOC_RECORD,
    checkpoint_power_ema,
)
from ddpm_hf.recipes.config import POSTHOC_SNAPSHOTS
from ddpm_hf.saved.ema_snapshots import drop_snapshots_after, write_snapshots
from ddpm_hf.saved.weights import refuse_unsound_weights, save_pipeline, verify_pipeline
from ddpm_hf.sampling.samplers import network_dtype
from ddpm_hf.outputs.run_folder import list_checkpoints
from ddpm_hf.training.checkpoints import (
    checkpoint_name,
    checkpoint_to_resume,
    load_checkpoint,
    plain_numbers,
    refuse_resume_past_end,
    rotate_checkpoints,
    save_checkpoint,
)
from ddpm_hf.recipes.config import TrainingConfig, checkpoint_settings, resume_changes
from ddpm_hf.training.optimizer import apply_optimizer_changes, end_step
from ddpm_hf.training.parts import (
    build_model,
    resolve_classes,
    run_unet_config,
    unet_config_json,
)
from ddpm_hf.devices import BF16_MIN_GAIN, rates_text
from ddpm_hf.training.precision import resolve_mixed_precision
from ddpm_hf.training.run_guard import RunFolderLock, RunStopped, StopSignals, check_fresh_start, check_user_files
from ddpm_hf.training.state import Clock, Run, TrainState
from ddpm_hf.training.step_graph import StepGraph, graph_refusal, step_state
from ddpm_hf.training.steps import device_step, seed_step
from ddpm_hf.training.watch import (
    ema_pipeline,
    evaluate_nll,
    evaluation_reference,
    load_held_out_images,
    log_sample_quality,
    save_card_figures,
    save_grid,
)

logger = get_logger(__name__)  # Accelerate's: logs on the main process only


class NonFiniteLossError(StateError):
    pass


def train(config: TrainingConfig, feature_network=None, hub_token: Optional[str] = None) -> Path:
    """Train as `config` says; return the output folder (pipeline with EMA weights, grids, loss curve,
    training_config.json, checkpoints, model card). `feature_network` replaces Inception-v3 for
    --eval_every. With --push_to_hub, `hub_token` (else HF_TOKEN or the login) is checked before anything
    else, and the folder's allow-listed files are pushed at the end (and every --hub_push_every steps)."""
    with deterministic_kernels(config.deterministic), \
            StopSignals(before_training="setting up (the data, the precision, the model)") as signals:
        run = setup(config, feature_network, hub_token)
        signals.before_training = None  # from here a signal stops at a step boundary, with a checkpoint
        try:
            state = resume(run)
            run_loop(run, state, signals)
            finish(run, state)
        finally:
            release(run)
    return run.output_dir


def release(run: Run) -> None:
    if run.lock is not None:
        run.lock.release()


# ---------------------------------------------------------------- 1. setup


def setup(config: TrainingConfig, feature_network=None, hub_token: Optional[str] = None) -> Run:
    """The settings' checks, the folder's lock, the checkpoint to resume and the data's size (before anything slow);
    then the precision, the accelerator, the Hub credentials and the Inception weights (before the data is decoded and
    the model built, so that they fail in seconds); the data; then the model and everything that trains it."""
    from ddpm_hf.training.batches import training_set
    from ddpm_hf.devices import distributed_state

    started = time.perf_counter()
    config.validate()
    state = distributed_state()
    world, accum = state.num_processes, config.gradient_accumulation_steps
    if config.batch_size % (world * accum):
        raise UsageError(
            f"--batch_size={config.batch_size} does not split evenly over {world} processes x {accum} accumulation steps; "
            f"use a multiple of {world * accum}."
        )
    if config.mixed_precision == "fp16" and not accelerator_available():
        raise UsageError("--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 (on a CPU with AVX512-BF16 "
                         "or AMX) or no.")
    # the folder, the checkpoint and the data's size first: --mixed_precision auto times the run's own step (a while)
    lock = RunFolderLock(Path(config.output_dir)).acquire(warn=logger.warning) if state.is_main_process else None
    try:
        config, checkpoint, changes = start_point(config, lock)
        training_set(config, None if config.streaming else config.batch_size)
        return accelerated_setup(config, lock, checkpoint, changes, feature_network, hub_token, started)
    except BaseException:
        if lock is not None:
            lock.release(abandon=True)
        raise


def start_point(config: TrainingConfig, lock) -> tuple:
    """(config, checkpoint, changes): the checkpoint to resume (or a fresh start where one may start) and the settings
    that differ from it. A resumed run keeps the precision its checkpoint trained in where --mixed_precision is auto
    (an exact resume, and no timing to redo)."""
    output_dir = Path(config.output_dir)
    checkpoint = checkpoint_to_resume(output_dir, config.resume_from_checkpoint, config.overwrite_output_dir,
                                      warn=logger.warning)
    if checkpoint is not None and config.mixed_precision == "auto":
        saved = checkpoint_settings(checkpoint, output_dir)
        if saved is not None and saved.mixed_precision != "auto":
            config = dataclasses.replace(config, mixed_precision=saved.mixed_precision)
    config = resolve_classes(config)  # bad labels: one line here, before the data is decoded
    changes = resume_changes(config, checkpoint) if checkpoint is not None else {}
    if checkpoint is not None and config.max_train_steps is not None:
        refuse_resume_past_end(checkpoint, config.resume_from_checkpoint, config.max_train_steps,
                               f"--max_train_steps {config.max_train_steps}")
    if checkpoint is None and lock is not None:
        check_fresh_start(output_dir, lock.had_marker, config.overwrite_output_dir or config.resume_from_checkpoint == "latest")
    if lock is not None:  # after the fresh-start check: a folder that is not ours at all has its own line
        check_user_files(output_dir, config.overwrite_output_dir, checkpoint is not None)
    if config.init_from and checkpoint is None:
        verify_pipeline(config.init_from)  # its weights load only once the model is built
    run_unet_config(config, checkpoint)  # a config that cannot be built: refused before the data and the timing
    return config, checkpoint, changes


def accelerated_setup(config: TrainingConfig, lock, checkpoint: Optional[Path], changes: dict, feature_network,
                      hub_token: Optional[str], started: float) -> Run:
    """`setup` once the folder is locked and the start point known: the precision, the accelerator, the Hub and the
    feature network (before the data and the model, so that they fail in seconds), then `build_run`."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    config, precision_choice = resolve_mixed_precision(config)
    accelerator = Accelerator(
        cpu=not accelerator_available(),
        mixed_precision=config.mixed_precision,
        # a CUDA graph captures the casts themselves (torch.cuda.graph's rule: no autocast cache while capturing)
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if config.cuda_graph and accelerator_available() else None,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
    )
    if precision_choice is not None:
        rates = rates_text(precision_choice.get("images_per_s", {}))
        chosen = "fp32 (full precision)" if config.mixed_precision == "no" else f"{config.mixed_precision} (mixed precision)"
        logger.info("--mixed_precision auto chose %s on the %s%s.", chosen, precision_choice["device"].upper(),
                    f": timed {rates}, and bf16 is taken where at least {BF16_MIN_GAIN:.2f}x "
                    "as fast" if rates else "")
    if config.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_bf16():
        logger.warning("This CPU has no native bf16 (AVX512-BF16 or AMX): --mixed_precision bf16 is emulated here and "
                       "slower than fp32; pass --mixed_precision no.")
    if config.eval_every or config.eval_nll_every:
        network_dtype(config.eval_dtype, accelerator.device, flag="--eval_dtype")  # fp16 on a CPU: refused here
    pusher = None
    if config.push_to_hub and accelerator.is_main_process:  # before anything is written
        from ddpm_hf.publishing.hub import HubPusher

        pusher = HubPusher(config.hub_model_id or Path(config.output_dir).resolve().name, hub_token,
                           config.hub_private_repo, config.output_dir)
        logger.info("Will push to %s.", pusher.url)
    if config.eval_every and feature_network is None:
        from ddpm_hf.measuring.folder_metrics import feature_network as load_feature_network

        feature_network = load_feature_network(config.eval_feature_network, accelerator.device, config.inception_weights,
                                               config.eval_dinov2_model, config.eval_cache_dir)
    return build_run(config, accelerator, lock, checkpoint, changes, pusher, feature_network, precision_choice, started)


def build_run(config: TrainingConfig, accelerator, lock, checkpoint: Optional[Path], changes: dict, pusher,
              feature_network, precision_choice: Optional[dict], started: float) -> Run:
    """`setup` once the output folder is locked and the start point known: the data, the evaluation reference, the
    model; the Run whole."""
    world = accelerator.num_processes
    held_out = load_held_out_images(config) if config.eval_nll_every else None
    micro = config.micro_batch(world)
    source = BatchSource(config, micro, accelerator.process_index, world,
                         progress=accelerator.is_local_main_process, device=accelerator.device)
    if source.skipped:
        logger.warning("Skipped %d undecodable images (--on_bad_image skip).", source.skipped)
    config, total_steps = run_length(config, source.steps_per_epoch, checkpoint)
    reference = evaluation_reference(config, feature_network, accelerator) if config.eval_every else None
    return Run(config=config, accelerator=accelerator, source=source, total_steps=total_steps, pusher=pusher,
               feature_network=feature_network, reference=reference, held_out=held_out, checkpoint=checkpoint,
               config_changes=changes, lock=lock, precision_choice=precision_choice, started=started,
               **build_model(config, accelerator, total_steps, checkpoint))


def run_length(config: TrainingConfig, steps_per_epoch: Optional[int], checkpoint: Optional[Path]) -> tuple:
    """(config, total steps) once the data's size is known, in one new config: the settings given in epochs as the step
    intervals they are for this data and batch, and --ema_posthoc's snapshot interval (recorded as resolved)."""
    changes = {}
    if config.save_images_epochs or config.save_model_epochs:
        if steps_per_epoch is None:
            raise UsageError("--save_images_epochs and --save_model_epochs need the dataset size; with --streaming give "
                             "--save_images_steps and --checkpointing_steps.")
        if config.save_images_epochs:
            changes["save_images_steps"] = config.save_images_epochs * steps_per_epoch
        if config.save_model_epochs:
            changes["checkpointing_steps"] = config.save_model_epochs * steps_per_epoch
        logger.info("Epochs are %d steps: %s.", steps_per_epoch, ", ".join(f"--{k} {v}" for k, v in changes.items()))
    if config.max_train_steps is not None:
        total_steps = config.max_train_steps
    elif steps_per_epoch is None:
        raise UsageError("--num_epochs needs the dataset size; with --streaming give --max_train_steps.")
    else:
        total_steps = config.num_epochs * steps_per_epoch
        if checkpoint is not None:
            refuse_resume_past_end(checkpoint, config.resume_from_checkpoint, total_steps,
                                   f"--num_epochs {config.num_epochs} of {steps_per_epoch} steps")
    if config.ema_posthoc and config.ema_posthoc_every is None:
        changes["ema_posthoc_every"] = max(1, total_steps // POSTHOC_SNAPSHOTS)
    return (dataclasses.replace(config, **changes) if changes else config), total_steps


# ---------------------------------------------------------------- 2. resume


def resume(run: Run) -> TrainState:
    """Clean the output folder of half-written files, restore the checkpoint asked for (if any) into the
    model, optimizer, LR schedule and EMA, and return its TrainState; then save the config, compute the
    evaluation reference and start the trackers."""
    config, accelerator = run.config, run.accelerator
    if run.is_main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.output_dir)
        clear_earlier_run(run)
    accelerator.wait_for_everyone()
    state = TrainState()
    if run.checkpoint is not None:
        state = TrainState.from_dict(load_checkpoint(run.checkpoint, run.raw_unet, run.ema.model, run.optimizer,
                                                     power_ema_files(run)))
        if run.posthoc is not None:
            run.posthoc.load_state(state.ema_power)
        run.lr_scheduler.load_state_dict(state.lr_scheduler)
        apply_optimizer_changes(config, run.optimizer, run.lr_scheduler, run.config_changes)
        run.ema.load_state(state.ema)
        if run.t_sampler.needs_losses:
            run.t_sampler.load_state_dict(state.timestep_sampler)
        state.nonfinite_in_a_row = 0  # a resume is a new attempt: only this session's skipped steps count toward the stop
        if run.config_changes:
            state.config_history.append({"step": state.step, "changes": run.config_changes})
            logger.warning("Resuming with changed settings (--allow_config_change): %s.", run.config_changes)
        logger.info("Resumed from %s at step %d.", run.checkpoint, state.step)
    elif config.resume_from_checkpoint == "latest":
        logger.info("No checkpoint in %s yet: starting from scratch.", run.output_dir)
    if run.posthoc is not None and run.is_main:
        dropped = drop_snapshots_after(run.output_dir, state.step)
        if dropped:
            logger.info("Removed %d post-hoc EMA snapshots after step %d: this run redoes them.", len(dropped), state.step)
    if run.precision_choice is not None:
        state.precision_choice = run.precision_choice
    run.meters.restore(state.nonfinite_total, state.nonfinite_in_a_row)
    run.source.fast_forward(state.step)
    if run.is_main:
        config.save(run.output_dir)
        (run.output_dir / SAMPLE_GRIDS_DIR).mkdir(exist_ok=True)
    if config.report_to != "none":
        accelerator.init_trackers(LOGS_DIR, config=_tracker_config(config))
    logger.info(
        "Training %d steps of %d images (%d per process x %d processes x %d accumulation) on %s; %s images.",
        run.total_steps, config.batch_size, run.source.micro, accelerator.num_processes,
        config.gradient_accumulation_steps, run.device, run.source.num_images or "streamed",
    )
    return state


def clear_earlier_run(run: Run) -> None:
    """With --overwrite_output_dir, remove an earlier run's checkpoints, grids and logs (each renamed to a
    temporary first); without it, say that an earlier run's logs stay beside the new ones."""
    leftovers = [p for p in run.output_dir.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) or p.name in RUN_PRODUCTS]
    if run.config.overwrite_output_dir and leftovers:
        for path in leftovers:
            remove_atomically(path)
        logger.warning("Removed the earlier run's %s from %s (--overwrite_output_dir).",
                       ", ".join(sorted(p.name for p in leftovers)), run.output_dir)
    elif run.checkpoint is None and (run.output_dir / LOGS_DIR).is_dir():
        logger.warning("%s holds the tracker logs of an earlier run; this run's go beside them (--overwrite_output_dir "
                       "removes them).", run.output_dir / LOGS_DIR)


def _tracker_config(config: TrainingConfig) -> Dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(config).items()}


# ---------------------------------------------------------------- 3. the loop


def run_loop(run: Run, state: TrainState, signals: Optional[StopSignals] = None) -> None:
    """The steps from state.step to the last, each followed by its periodic work; `signals` end the run at a step
    boundary when one has been received."""
    from tqdm.auto import tqdm

    if run.config.eval_every and state.step % run.config.eval_every == 0 and state.step > 0:
        if not any(e["step"] == state.step for e in state.evals):  # the checkpoint was written before its evaluation
            measure_and_keep_best(run, state)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="Training",
               disable=not run.accelerator.is_local_main_process)
    graph = start_step_graph(run)
    clock = Clock(state.step)
    threads = cpu_threads.governor(run.device, "training step")
    if threads is not None:
        logger.info("%s.", cpu_threads.describe())
    try:
        for step in range(state.step, run.total_steps):
            run_step(run, step, graph)
            if threads is not None:
                threads.tick()
            state.step = step + 1
            bar.update(1)
            periodic_work(run, state, bar, clock)
            signum = stop_requested(run, state.step, signals)
            if signum:
                bar.close()  # its last line ends before any process prints the stop line (see stop)
                stop(run, state, signum)
    finally:
        bar.close()
        if threads is not None:
            logger.info("%s.", threads.summary())


def start_step_graph(run: Run) -> Optional[StepGraph]:
    """The StepGraph that replays each step, where a step can be a CUDA graph (step_graph.py); else None, and one line
    saying why not."""
    refusal = graph_refusal(run.config, run.device, run.accelerator.num_processes)
    if refusal is not None:
        logger.info("Each training step runs eagerly: %s.", refusal)
        return None
    config = run.config
    shape = (run.source.micro, config.channels, *size_of(config.resolution))
    return StepGraph(functools.partial(device_step, run), run.source, shape, config.gradient_accumulation_steps,
                     run.device, run.generator, run.optimizer, run.ema,
                     state=lambda: step_state(run.raw_unet, run.optimizer, run.ema, run.meters, run.posthoc),
                     posthoc=run.posthoc,
                     labelled=config.class_conditional)


# Several processes agree on a stop every this many steps (a collective, which waits for the device); one process
# reads its own flag after every step.
STOP_CHECK_EVERY = 10


def stop_requested(run: Run, step: int, signals: Optional[StopSignals]) -> Optional[int]:
    """The signal that asks the run to stop after this step, agreed by every process (the largest one received)."""
    if signals is None:
        return None
    if run.accelerator.num_processes == 1:
        return signals.received
    if step % STOP_CHECK_EVERY and step != run.total_steps:
        return None
    flag = torch.tensor([signals.received or 0], device=run.device)
    return int(run.accelerator.reduce(flag, reduction="max").item()) or None  # note: a host sync, every few steps


def stop(run: Run, state: TrainState, signum: int) -> None:
    """Checkpoint the step just finished (unless periodic work just did) and end the run with the line that resumes it."""
    import signal

    name = checkpoint_name(state.step)
    if not (run.output_dir / name).is_dir():
        write_checkpoint(run, state)
    # Every process raises the same line and the first to get there prints it: wait until the main process has
    # closed its progress bar, else the line can land after the bar's unfinished one on a shared stderr.
    run.accelerator.wait_for_everyone()
    raise RunStopped(f"{signal.Signals(signum).name} received: stopped after step {state.step} of {run.total_steps} with "
                     f"{run.output_dir / name} written", signum, f"`python train_ddpm.py --output_dir {run.output_dir} "
                     "--resume_from_checkpoint latest` (or the same under accelerate launch)")


def run_step(run: Run, step: int, graph: Optional[StepGraph] = None) -> None:
    """One optimizer step of Algorithm 1 over `gradient_accumulation_steps` micro-batches, then gradient
    clipping, Adam (skipped on the device if the gradient is not finite), the EMA and the LR schedule: replayed as
    a CUDA graph where `graph` is one, else launched here. It only queues work on the device: nothing here waits
    for it."""
    seed_step(run, step)
    if graph is not None:
        graph.step(step)
    else:
        accum = range(run.config.gradient_accumulation_steps)
        batches = [run.source.get(step, j) for j in accum]
        labels = [run.source.labels(step, j) for j in accum] if run.config.class_conditional else None
        power_weights = run.posthoc.fill(step + 1) if run.posthoc is not None else None  # t: steps after this one
        device_step(run, batches, labels=labels, power_weights=power_weights)
    end_step(run, gradients=graph is None)  # a graph clears its own


# ---------------------------------------------------------------- periodic work


def periodic_work(run: Run, state: TrainState, bar, clock: Clock) -> None:
    """After step state.step: read the counters and log; then, outside the training clock, the checkpoint
    (before the grid and the evaluation: a kill during them loses no training), the grid, the evaluation,
    and a push of the pipeline so far."""
    config, done = run.config, state.step

    def due(every: Optional[int]) -> bool:
        return bool(every) and (done % every == 0 or done == run.total_steps)

    log_now = due(config.logging_steps) or done == 1  # the first step too: a short run's curve has two points
    if log_now or due(config.checkpointing_steps):
        check_nonfinite(run, state)
    if log_now:
        log_progress(run, state, bar, clock)
    push_now = bool(run.pusher and config.hub_push_every and done % config.hub_push_every == 0 and done < run.total_steps)
    with clock.pause():
        if run.is_main and state.history and (due(config.checkpointing_steps) or push_now):
            plot_loss_curve(state.history, run.output_dir / LOSS_CURVE)
        if run.posthoc is not None and run.is_main and due(config.ema_posthoc_every):
            # before the checkpoint of the same step: a kill between the two resumes from the one before, which
            # writes this snapshot again (the same bytes)
            write_snapshots(run.output_dir, done, run.posthoc, config.ema_posthoc_dtype)
        if due(config.checkpointing_steps):
            write_checkpoint(run, state)
        if due(config.save_images_steps):
            save_grid(run, done)
        if due(config.eval_every):
            measure_and_keep_best(run, state)
        if due(config.eval_nll_every):
            evaluate_nll(run, state)
        if push_now:  # the EMA pipeline and card so far; the upload runs in the background
            save_ema_pipeline(run)
            write_model_card(run.output_dir, run.pusher.repo_id, progress=(done, run.total_steps))
            run.pusher.push_in_background(run.output_dir, f"Training step {done} of {run.total_steps}")


def check_nonfinite(run: Run, state: TrainState) -> None:
    """Read the non-finite step counters into the state (a host synchronisation); stop the run once
    --max_nonfinite_in_a_row steps in a row were skipped."""
    total, in_a_row, longest = run.meters.read_counters()
    if total > state.nonfinite_total:
        logger.warning("%d step(s) up to step %d had a non-finite loss or gradient and were skipped (%d in a row now).",
                       total - state.nonfinite_total, state.step, in_a_row)
    state.nonfinite_total, state.nonfinite_in_a_row = total, in_a_row
    if longest >= run.config.max_nonfinite_in_a_row:
        raise NonFiniteLossError(
            f"The loss was non-finite for {longest} steps in a row (up to step {state.step}). "
            "Lower --learning_rate, keep --max_grad_norm on, try --mixed_precision bf16 or no, or check the data; "
            "resume with --resume_from_checkpoint latest."
        )


def log_progress(run: Run, state: TrainState, bar, clock: Clock) -> None:
    """Append the mean losses since the last log (overall and by timestep quartile, over all processes), the
    LR, EMA decay and throughput to the history; send them to the trackers and the progress bar."""
    means, counts = run.meters.read_losses(run.accelerator)
    seconds, steps = clock.lap(state.step)
    entry = {"step": state.step, "loss": means[0], "lr": float(run.lr_scheduler.get_last_lr()[0]),
             "ema_decay": run.ema.current_decay(), "seconds": seconds,
             "images_per_s": steps * run.config.batch_size / seconds}
    entry.update({f"loss_t_q{q}": means[q] for q in range(1, 5) if counts[q] > 0})
    state.history.append(entry)
    metrics = {k: v for k, v in entry.items() if k not in ("step", "seconds")}
    run.accelerator.log({**metrics, "nonfinite_total": state.nonfinite_total}, step=state.step)
    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", ema=f"{entry['ema_decay']:.4f}")


def check_run_weights(run: Run, state: TrainState, what: str) -> None:
    """Raise NonFiniteWeightsError (on every process: each holds the same weights) rather than save unsound ones."""
    config = run.config
    refuse_unsound_weights({"UNet": run.raw_unet, "EMA": run.ema.model}, what, step=state.step,
                           probe=(config.channels, config.resolution, config.num_train_timesteps),
                           advice=f"{state.nonfinite_total} of {state.step} steps were skipped as non-finite; resume from "
                                  f"the last checkpoint in {run.output_dir} with a lower --learning_rate")


def write_checkpoint(run: Run, state: TrainState, name: Optional[str] = None) -> None:
    """checkpoint-<step>/ (rotated) or `name`/ (outside the rotation), written by the main process; never with
    unsound weights."""
    check_run_weights(run, state, name or checkpoint_name(state.step))
    if run.is_main:
        state.lr_scheduler, state.ema = plain_numbers(run.lr_scheduler.state_dict()), run.ema.state()
        state.timestep_sampler = run.t_sampler.state_dict()
        state.ema_power = run.posthoc.state() if run.posthoc is not None else None
        save_checkpoint(run.output_dir, state.step, run.raw_unet, run.ema.model, run.optimizer, state.to_dict(), name=name,
                        extra_files={TRAINING_CONFIG: run.config.to_json(),
                                     CHECKPOINT_UNET_CONFIG: unet_config_json(run.raw_unet)},
                        averages=power_ema_files(run))
        if name is None:
            rotate_checkpoints(run.output_dir, run.config.checkpoints_total_limit)
    run.accelerator.wait_for_everyone()


def power_ema_files(run: Run) -> Dict[str, torch.nn.Module]:
    """--ema_posthoc's power EMAs by the file a checkpoint keeps each in ({} without it)."""
    if run.posthoc is None:
        return {}
    return {checkpoint_power_ema(s): m for s, m in zip(run.posthoc.sigma_rels, run.posthoc.models)}


def measure_and_keep_best(run: Run, state: TrainState) -> None:
    """The sample quality of now (`watch.log_sample_quality`); with --keep_best, best_checkpoint/ when it is the best so far."""
    if log_sample_quality(run, state):
        write_checkpoint(run, state, name=BEST_CHECKPOINT)


def save_ema_pipeline(run: Run) -> None:
    save_pipeline(ema_pipeline(run), run.output_dir)
    for stale in (POSTHOC_RECORD, EMA_SWEEP_PLOT):  # an earlier `ddpm-ema --keep best`: no longer what is published
        (run.output_dir / stale).unlink(missing_ok=True)


# ---------------------------------------------------------------- 4. finish


def finish(run: Run, state: TrainState) -> None:
    """The pipeline with the EMA weights, train_summary.json and the model card; then the final push. Unsound final
    weights end the run with one line saying so, and nothing is written over the last checkpoint and pipeline."""
    check_run_weights(run, state, "the pipeline")
    if run.is_main:
        save_ema_pipeline(run)
        if run.config.card_figures:
            save_card_figures(run)
        atomic_write_json(run.output_dir / TRAIN_SUMMARY, {
            "steps": run.total_steps, "images_seen": run.total_steps * run.config.batch_size,
            "skipped_images": run.source.skipped, "nonfinite_steps": state.nonfinite_total,
            "final_loss": state.history[-1]["loss"] if state.history else None, "evals": state.evals, "best": state.best,
            "nll": state.nll, "config_history": state.config_history, "mixed_precision": run.config.mixed_precision,
            "mixed_precision_auto": state.precision_choice,
            "hardware": {"device": run.device.type, "name": device_name(run.device), "processes": run.accelerator.num_processes},
            "training_seconds": sum(h["seconds"] for h in state.history),  # the steps of every session, resumed ones too
            "wall_seconds": time.perf_counter() - run.started,  # this session, from setup
            "checkpoints": [str(f.name) for _, f in list_checkpoints(run.output_dir)],
        })
        write_model_card(run.output_dir, run.pusher.repo_id if run.pusher else None)
        logger.info("Saved the pipeline (EMA weights) and its model card to %s.", run.output_dir)
        if state.nonfinite_total:
            logger.warning("%d of %d steps had a non-finite loss or gradient and were skipped (see train_summary.json).",
                           state.nonfinite_total, run.total_steps)
    run.accelerator.wait_for_everyone()
    # not end_training(): it also ends the process group, which ddpm-distill's next round (a training run in the same
    # processes) and its barriers still need; the command ends the group as it exits (commands.running)
    for tracker in run.accelerator.trackers:
        tracker.finish()
    if run.pusher is not None:
        try:
            run.pusher.push(run.output_dir, f"End of training: step {run.total_steps}")
            logger.info("Pushed %s to %s.", run.output_dir, run.pusher.url)
        finally:
            run.pusher.close()
