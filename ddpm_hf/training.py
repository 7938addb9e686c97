"""The training loop (Algorithm 1 of the paper) on Accelerate: one process or many, CPU or GPUs.

Determinism: everything random in step k (the batch, flips, noise, timesteps, dropout) is drawn from
generators seeded by (seed, k, rank), and the data order of epoch e is a permutation seeded by
(seed, e). A run resumed from checkpoint k therefore continues exactly as the uninterrupted run.

Batch size: `batch_size` images per optimizer step in total, split evenly over processes and
gradient-accumulation micro-batches; steps count optimizer steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from .config import TrainingConfig
from .data import build_image_bank, find_image_column, load_image_dataset, stream_batches, to_model_range
from .ema import EMA
from .losses import diffusion_loss, min_snr_weight, snr, training_target
from .model_card import write_model_card
from .outputs import (
    atomic_save_image,
    atomic_write_json,
    image_grid,
    list_checkpoints,
    load_checkpoint,
    plot_loss_curve,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    save_pipeline,
)
from .scheduler import DDPMScheduler
from .unets import build_unet

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing), so nearby (seed, step, rank) give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch, 0xDA7A)))


def make_scheduler(config: TrainingConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        variance_type=config.variance_type,
        clip_sample=True,
    )


def make_unet(config: TrainingConfig):
    extra = {} if config.dropout is None else {"dropout": config.dropout}
    return build_unet(config.unet_preset, sample_size=config.resolution, in_channels=config.channels, **extra)


class BatchSource:
    """uint8 micro-batches for (step, micro-batch j) on this rank: from an in-memory ImageBank (exact
    resume), or from a stream."""

    def __init__(self, config: TrainingConfig, micro: int, rank: int, world: int, progress: bool):
        self.config, self.micro, self.rank, self.world = config, micro, rank, world
        ds = load_image_dataset(config.dataset, config.dataset_config, config.split, config.streaming)
        features = ds.features
        if features is None:
            raise ValueError(f"The dataset {config.dataset!r} does not declare its columns; name the image column with --image_column.")
        self.column = find_image_column(features, config.image_column)
        self.skipped = 0
        if config.streaming:
            self.bank = None
            self.ds = ds.take(config.max_train_samples) if config.max_train_samples else ds
            self.steps_per_epoch = None
            self._stream: Optional[Iterator] = None
            self._stream_epoch = -1
        else:
            if config.max_train_samples:
                ds = ds.select(range(min(config.max_train_samples, len(ds))))
            self.bank = build_image_bank(ds, self.column, config.channels, config.resolution, config.center_crop,
                                         config.on_bad_image, progress)
            self.skipped = self.bank.skipped
            per_step = micro * world * config.gradient_accumulation_steps
            self.steps_per_epoch = len(self.bank) // per_step
            if self.steps_per_epoch == 0:
                raise ValueError(f"The dataset has {len(self.bank)} usable images, fewer than one batch of {per_step}; lower --batch_size.")
            self._perm_epoch, self._perm = -1, None

    @property
    def num_images(self) -> Optional[int]:
        return None if self.bank is None else len(self.bank)

    def get(self, step: int, j: int) -> torch.Tensor:
        accum = self.config.gradient_accumulation_steps
        if self.bank is not None:
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != self._perm_epoch:
                self._perm, self._perm_epoch = epoch_permutation(self.config.seed, epoch, len(self.bank)), epoch
            start = ((pos * accum + j) * self.world + self.rank) * self.micro
            return self.bank.images[self._perm[start : start + self.micro]]
        return self._next_streamed()

    def _next_streamed(self) -> torch.Tensor:
        while True:
            if self._stream is None:
                self._stream_epoch += 1
                c = self.config
                self._stream = stream_batches(self.ds, self.column, self.micro, c.channels, c.resolution, c.center_crop,
                                              c.on_bad_image, self.rank, self.world, c.seed, self._stream_epoch)
            batch = next(self._stream, None)
            if batch is not None:
                return batch
            self._stream = None

    def fast_forward(self, step: int) -> None:
        """For streams: consume the micro-batches of steps before `step` (banks need nothing)."""
        if self.bank is None:
            for _ in range(step * self.config.gradient_accumulation_steps):
                self._next_streamed()


def accelerator_available() -> bool:
    """Whether torch sees a GPU or other accelerator. Without one, Accelerate must be told `cpu=True`,
    or several processes (torchrun / `accelerate launch --multi_gpu`) do not form a gloo group."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def _tracker_config(config: TrainingConfig) -> Dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(config).items()}


def sample_images(unet, scheduler_config, config: TrainingConfig, accelerator, device) -> torch.Tensor:
    """The fixed-seed sample images (image i from seed (seed, i)), shared out over all processes and
    gathered; every process returns the full [N, C, H, W] batch in [0, 1]."""
    from accelerate.utils import gather_object

    from .pipelines.pipeline_ddpm import DDPMPipeline

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=not accelerator.is_local_main_process, desc="Sampling grid", leave=False)
    mine = list(range(accelerator.process_index, config.num_sample_images, accelerator.num_processes))
    images = []
    if mine:
        gens = [torch.Generator(device).manual_seed(_seed(config.seed, i, 0x5A3)) for i in mine]
        steps = config.sample_inference_steps or config.num_train_timesteps
        images = pipe(batch_size=len(mine), generator=gens, num_inference_steps=steps, output_type="pt").images.cpu()
    gathered = gather_object(list(zip(mine, images)))
    gathered.sort(key=lambda pair: pair[0])
    return torch.stack([img for _, img in gathered])


def evaluate_during_training(unet, scheduler_config, config: TrainingConfig, accelerator, device, network, reference) -> dict:
    """FID (and IS) of `eval_samples` images from `unet` drawn with DDIM in `eval_steps` steps, each process
    drawing its share (image i from seed (seed, i)); every process returns the same numbers."""
    from accelerate.utils import gather_object
    from diffusers import DDIMScheduler

    from .evaluation import features_of_images
    from .metrics import feature_statistics, frechet_distance, inception_score
    from .pipelines.pipeline_ddpm import DDPMPipeline

    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    mine = list(range(accelerator.process_index, config.eval_samples, accelerator.num_processes))
    chunk = max(1, config.batch_size // (accelerator.num_processes * config.gradient_accumulation_steps))
    rows = []
    for i in range(0, len(mine), chunk):
        ids = mine[i : i + chunk]
        gens = [torch.Generator(device).manual_seed(_seed(config.seed, k, 0xE7A1)) for k in ids]
        images = pipe(batch_size=len(ids), generator=gens, num_inference_steps=config.eval_steps, output_type="pt", eta=0.0).images
        rows += list(zip(ids, features_of_images(images, network, device=device)))
    gathered = sorted(gather_object(rows), key=lambda pair: pair[0])
    feats = torch.stack([f for _, f in gathered]).double().numpy()
    d = network.num_features
    result = {"fid": frechet_distance(*feature_statistics(feats[:, :d]), *reference)}
    if feats.shape[1] > d and feats.shape[0] >= 10:
        result["inception_score"] = inception_score(feats[:, d:], splits=10)[0]
    return result


def train(config: TrainingConfig, feature_network=None, hub_token: Optional[str] = None) -> Path:
    """Train as `config` says; return the output folder (pipeline with EMA weights, grids, loss curve,
    training_config.json, checkpoints, model card). `feature_network` replaces Inception-v3 for
    --eval_every. With --push_to_hub, `hub_token` (else HF_TOKEN or the login) is checked before anything
    else, and the folder's allow-listed files are pushed at the end (and every --hub_push_every steps)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .pipelines.pipeline_ddpm import DDPMPipeline

    config.validate()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        cpu=not accelerator_available(),
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(output_dir),
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    accum = config.gradient_accumulation_steps
    if config.batch_size % (world * accum):
        raise ValueError(
            f"--batch_size={config.batch_size} does not split evenly over {world} processes x {accum} accumulation steps; "
            f"use a multiple of {world * accum}."
        )
    micro = config.batch_size // (world * accum)
    is_main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2", "httpcore"):  # one INFO line per HTTP request while pushing
        logging.getLogger(chatty).setLevel(logging.WARNING)
    pusher = None
    if config.push_to_hub and is_main:  # before the data and the model: a bad token fails in seconds
        from .hub import HubPusher

        pusher = HubPusher(config.hub_model_id or output_dir.resolve().name, hub_token, config.hub_private_repo, str(output_dir))
        logger.info("Will push to %s.", pusher.url)
    if config.eval_every and feature_network is None:
        from .evaluation import inception_network, resolve_inception_weights

        feature_network = inception_network(resolve_inception_weights(config.inception_weights, config.eval_cache_dir), device)

    # 1. data
    source = BatchSource(config, micro, rank, world, progress=accelerator.is_local_main_process)
    if source.skipped:
        logger.warning("Skipped %d undecodable images (--on_bad_image skip).", source.skipped)
    if config.max_train_steps is not None:
        total_steps = config.max_train_steps
    elif source.steps_per_epoch is None:
        raise ValueError("--num_epochs needs the dataset size; with --streaming give --max_train_steps.")
    else:
        total_steps = config.num_epochs * source.steps_per_epoch

    # 2. model, diffusion, optimizer, EMA
    set_seed(config.seed)
    unet = make_unet(config)
    scheduler = make_scheduler(config)
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        unet.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
        weight_decay=config.weight_decay, **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps)
    ema = EMA(unet, decay=config.ema_decay, warmup=config.ema_warmup, inv_gamma=config.ema_inv_gamma,
              power=config.ema_power, update_after_step=config.ema_update_after_step)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.model.to(device)
    raw_unet = accelerator.unwrap_model(unet)
    forward = torch.compile(unet) if config.compile else unet

    # 3. resume
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir)
    accelerator.wait_for_everyone()
    start_step, history, evals = 0, [], []
    counters = {"nonfinite_total": 0, "nonfinite_in_a_row": 0}
    checkpoint = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, raw_unet, ema.model, optimizer)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        ema.load_state(state["ema"])
        start_step, history, evals = state["step"], state["history"], state.get("evals", [])
        counters = {k: state[k] for k in counters}
        logger.info("Resumed from %s at step %d.", checkpoint, start_step)
    elif config.resume_from_checkpoint == "latest":
        logger.info("No checkpoint in %s yet: starting from scratch.", output_dir)
    source.fast_forward(start_step)

    if is_main:
        config.save(output_dir)
        (output_dir / "samples").mkdir(exist_ok=True)
    reference, best = None, None
    if config.eval_every:
        from .evaluation import default_cache_dir, reference_features
        from .metrics import feature_statistics

        cache = Path(config.eval_cache_dir or default_cache_dir())
        for turn in (0, 1):  # the main process computes and caches the training set's features; the others read them
            if (turn == 0) == is_main:
                ref, _ = reference_features(config.dataset, feature_network, "clean", cache, config.split,
                                            config.resolution, config.channels)
                reference = feature_statistics(ref[:, : feature_network.num_features])
            accelerator.wait_for_everyone()
        best = (checkpoint and state.get("best")) or None
    if config.report_to != "none":
        accelerator.init_trackers("logs", config=_tracker_config(config))
    logger.info(
        "Training %d steps of %d images (%d per process x %d processes x %d accumulation) on %s; %s images.",
        total_steps, config.batch_size, micro, world, accum, device, source.num_images or "streamed",
    )

    # 4. the loop (Algorithm 1)
    T = config.num_train_timesteps
    log_sum = torch.zeros(5, device=device)  # loss sum over samples: all, then by timestep quartile
    log_count = torch.zeros(5, device=device)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not accelerator.is_local_main_process, desc="Training")
    last_log_time, last_log_step = time.perf_counter(), start_step

    def trainer_state() -> dict:
        return {"lr_scheduler": lr_scheduler.state_dict(), "ema": ema.state(), "history": history, "evals": evals,
                "best": best, **counters}

    def save_ema_pipeline() -> None:
        save_pipeline(DDPMPipeline(unet=ema.model, scheduler=DDPMScheduler.from_config(scheduler.config)), output_dir)

    for step in bar:
        generator = torch.Generator(device).manual_seed(_seed(config.seed, step, rank))
        torch.manual_seed(_seed(config.seed, step, rank, 0xD0))  # dropout
        finite = True
        for j in range(accum):
            x0 = to_model_range(source.get(step, j).to(device, non_blocking=True), config.random_flip, generator)
            if config.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            t = torch.randint(0, T, (x0.shape[0],), generator=generator, device=device)
            x_t = scheduler.add_noise(x0, noise, t)  # q(x_t | x_0), Eq. 4
            with accelerator.autocast():
                model_output = forward(x_t, t).sample
            weight = None
            if config.snr_gamma is not None:
                weight = min_snr_weight(snr(scheduler, t, x0), config.snr_gamma, config.prediction_type)
            per_sample = diffusion_loss(model_output, training_target(scheduler, x0, noise, t), weight)
            sync = contextlib.nullcontext() if j == accum - 1 else accelerator.no_sync(unet)
            with sync:
                accelerator.backward(per_sample.mean() / accum)
            detached = per_sample.detach()
            finite = finite and bool(torch.isfinite(detached).all())
            quartile = 1 + (t * 4 // T)
            log_sum[0] += detached.sum()
            log_count[0] += detached.numel()
            log_sum.scatter_add_(0, quartile, detached)
            log_count.scatter_add_(0, quartile, torch.ones_like(detached))
        # every process must agree on skipping, or the replicas diverge
        finite = bool(accelerator.reduce(torch.tensor([float(finite)], device=device), reduction="sum").item() == world)
        if finite:
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
            optimizer.step()
            counters["nonfinite_in_a_row"] = 0
        else:
            counters["nonfinite_total"] += 1
            counters["nonfinite_in_a_row"] += 1
            logger.warning("Step %d: non-finite loss, step skipped (%d in a row).", step + 1, counters["nonfinite_in_a_row"])
            if counters["nonfinite_in_a_row"] >= config.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"The loss was non-finite for {counters['nonfinite_in_a_row']} steps in a row (up to step {step + 1}). "
                    "Lower --learning_rate, keep --max_grad_norm on, try --mixed_precision bf16 or no, or check the data; "
                    "resume with --resume_from_checkpoint latest."
                )
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        ema.update(raw_unet.parameters())
        done = step + 1

        if done % config.logging_steps == 0 or done == total_steps:
            sums = accelerator.reduce(log_sum, reduction="sum")
            counts = accelerator.reduce(log_count, reduction="sum")
            means = (sums / counts.clamp(min=1)).tolist()
            now = time.perf_counter()
            seconds, last_log_time = now - last_log_time, now
            entry = {"step": done, "loss": means[0], "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.current_decay(),
                     "seconds": seconds, "images_per_s": (done - last_log_step) * config.batch_size / seconds}
            last_log_step = done
            entry.update({f"loss_t_q{q}": means[q] for q in range(1, 5) if counts[q] > 0})
            history.append(entry)
            log_sum.zero_()
            log_count.zero_()
            accelerator.log({**{k: v for k, v in entry.items() if k not in ("step", "seconds")}, "nonfinite_total": counters["nonfinite_total"]}, step=done)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", ema=f"{entry['ema_decay']:.4f}")

        pause = time.perf_counter()
        if done % config.save_images_steps == 0 or done == total_steps:
            grid_images = sample_images(ema.model, scheduler.config, config, accelerator, device)
            if is_main:
                grid = image_grid(grid_images)
                atomic_save_image(grid, output_dir / "samples" / f"step-{done:07d}.png")
                atomic_save_image(grid, output_dir / "samples.png")
                _log_images(accelerator, grid, done)

        if config.eval_every and (done % config.eval_every == 0 or done == total_steps):
            metrics = evaluate_during_training(ema.model, scheduler.config, config, accelerator, device, feature_network, reference)
            evals.append({"step": done, **metrics})
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=done)
            logger.info("Step %d: FID %.4f (%d samples, DDIM %d steps)%s", done, metrics["fid"], config.eval_samples,
                        config.eval_steps, f", IS {metrics['inception_score']:.3f}" if "inception_score" in metrics else "")
            if config.keep_best and (best is None or metrics["fid"] < best["fid"]):
                best = {"step": done, "fid": metrics["fid"]}
                if is_main:
                    save_checkpoint(output_dir, done, raw_unet, ema.model, optimizer, trainer_state(), name="best_checkpoint")
                accelerator.wait_for_everyone()

        checkpoint_now = done % config.checkpointing_steps == 0 or done == total_steps
        push_now = pusher is not None and config.hub_push_every and done % config.hub_push_every == 0 and done < total_steps
        if is_main and history and (checkpoint_now or push_now):
            plot_loss_curve(history, output_dir / "loss_curve.png")
        if checkpoint_now:
            if is_main:
                save_checkpoint(output_dir, done, raw_unet, ema.model, optimizer, trainer_state())
                rotate_checkpoints(output_dir, config.checkpoints_total_limit)
            accelerator.wait_for_everyone()

        if push_now:  # the EMA pipeline and card so far; the upload runs in the background
            save_ema_pipeline()
            write_model_card(output_dir, pusher.repo_id, progress=(done, total_steps))
            pusher.push_in_background(output_dir, f"Training step {done} of {total_steps}")
        last_log_time += time.perf_counter() - pause  # grids and checkpoints are not training time

    # 5. the final pipeline, with the EMA weights
    if is_main:
        save_ema_pipeline()
        atomic_write_json(output_dir / "train_summary.json", {
            "steps": total_steps, "images_seen": total_steps * config.batch_size, "skipped_images": source.skipped,
            "nonfinite_steps": counters["nonfinite_total"], "final_loss": history[-1]["loss"] if history else None,
            "evals": evals, "best": best,
            "checkpoints": [str(f.name) for _, f in list_checkpoints(output_dir)],
        })
        write_model_card(output_dir, pusher.repo_id if pusher else None)
        logger.info("Saved the pipeline (EMA weights) and its model card to %s.", output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if pusher is not None:
        try:
            pusher.push(output_dir, f"End of training: step {total_steps}")
            logger.info("Pushed %s to %s.", output_dir, pusher.url)
        finally:
            pusher.close()
    return output_dir


def _log_images(accelerator, grid, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid)}, step=step)
