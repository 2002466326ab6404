"""Training loop for the paper's network (section 4.2): CE + batch-hard triplet, Adam, step decay.

:func:`train` runs the whole loop on one CPU, one GPU, or many GPUs on many machines under
``torchrun`` (DDP: NCCL on GPU, gloo on CPU); it reads in one screen. Each step
(:func:`train_step`): forward under autocast (bf16/fp16), backward through the GradScaler
(fp16 only), the optimizer step. Each epoch (:func:`train_epoch`): the steps, the losses read
back every ``log_every`` steps (:class:`fastnl.run_log.RunLog`: tqdm, CSV, TensorBoard, NaN/Inf
check), and atomic checkpoints (:class:`fastnl.checkpoint.Checkpointer`: model, optimizer,
scaler, scheduler, RNG state and the (epoch, batch) position, so that ``--resume`` continues
exactly where a run stopped, mid-epoch included). The options: :class:`TrainConfig`.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fastnl.checkpoint import (CHECKPOINT_FILE, Checkpointer, remove_stale_temp_files,  # noqa: F401
                               rng_state, set_rng_state)
from fastnl.errors import UserError
from fastnl.run_log import CURVE_FILE, LOG_FIELDS, LOG_FILE, RunLog, plot_training_curve  # noqa: F401
from fastnl.runtime import (AMP_DTYPES, Distributed, autocast, grad_scaler, resolve_amp,  # noqa: F401
                            setup_distributed)
from fastnl.train_config import CONFIG_FILE, TrainConfig  # noqa: F401

MEMORY_ADVICE = ("reduce memory with --grad-checkpoint, --amp bf16, --impl fused, fewer --frames, "
                 "or a smaller --p or --k (clips per GPU = P x K)")


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train (or resume) the run in ``cfg.out``. Returns {"step", "epoch", "checkpoint", "loss",
    "stopped"}."""
    cfg.validate()
    env = setup_distributed(cfg.device)
    try:
        run = setup(cfg, env, resume)
        with _StopRequest() as stop:
            while run.epoch < cfg.epochs and not run.stopped:
                train_epoch(run, stop)
        if run.stopped:
            run.log.print(f"stopped after step {run.step} by a signal or --max-minutes; checkpoint "
                          f"{run.ckpt.path}; continue with --resume {cfg.out}")
        run.log.close(plot=True)
        return {"step": run.step, "epoch": run.epoch, "checkpoint": str(run.ckpt.path), "loss": run.log.loss,
                "stopped": run.stopped}
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """Everything a run holds; ``step`` counts optimizer steps, (epoch, start_batch) is where the
    sampler continues."""
    cfg: TrainConfig
    env: Distributed
    loader: object
    model: torch.nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    amp_dtype: torch.dtype | None
    ckpt: Checkpointer
    log: RunLog
    step: int = 0
    epoch: int = 0
    start_batch: int = 0
    stopped: bool = False  # a SIGTERM/SIGINT seen by any rank, or --max-minutes reached

    def out_of_time(self) -> bool:
        return bool(self.cfg.max_minutes) and time.perf_counter() - self.log.t_start > 60 * self.cfg.max_minutes


def train_epoch(run: Run, stop: _StopRequest) -> None:
    """One epoch from ``run.start_batch``; stops early (checkpointed) when a stop is asked for."""
    cfg, batches = run.cfg, len(run.loader)
    run.loader.set_epoch(run.epoch, run.start_batch)
    run.log.start_epoch(run.epoch, run.start_batch, batches)
    run.model.train()
    for batch, (clips, pids, _camids) in enumerate(run.loader, start=run.start_batch):
        t0 = time.perf_counter()
        loss, parts = train_step(run, clips, pids)
        run.step += 1
        run.log.record(run.step, run.epoch, batch, loss, parts, clips.shape[0],
                       run.optimizer.param_groups[0]["lr"], t0)
        last = batch + 1 == batches
        save_now = bool(cfg.save_every_steps) and run.step % cfg.save_every_steps == 0 and not last
        asked = stop.requested or run.out_of_time()
        # every rank syncs at the same steps; a lone process also as soon as it is asked to stop
        if last or save_now or run.step % cfg.log_every == 0 or (asked and not run.env.enabled):
            _sync(run, asked)
        if run.stopped and not last:
            run.log.end_epoch()
            _save(run, run.epoch, batch + 1)
            return
        if save_now:
            _save(run, run.epoch, batch + 1)
    run.log.end_epoch()
    run.start_batch, run.epoch = 0, run.epoch + 1
    run.scheduler.step()
    if (run.epoch % cfg.save_every == 0 or run.epoch == cfg.epochs or run.stopped
            or (cfg.save_every_steps and run.step % cfg.save_every_steps == 0)):
        _save(run, run.epoch, 0)
    run.log.epoch_line(run.epoch, run.step, run.optimizer.param_groups[0]["lr"])


def train_step(run: Run, clips, pids):
    """Forward, backward and the optimizer step on one batch; returns the detached losses."""
    clips = clips.to(run.env.device, non_blocking=True)
    pids = pids.to(run.env.device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    try:
        loss, parts = forward_backward(run.model, run.criterion, clips, pids, amp_dtype=run.amp_dtype,
                                       scaler=run.scaler)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    except torch.OutOfMemoryError as err:
        raise UserError(f"out of memory at step {run.step + 1} with {clips.shape[0]} clips x {run.cfg.frames} "
                        f"frames at {run.cfg.height}x{run.cfg.width}: {MEMORY_ADVICE}") from err
    return loss, parts


def forward_backward(model, criterion, clips, pids, *, amp_dtype, scaler):
    """One forward and backward pass; returns (loss, {"ce", "triplet"}) detached."""
    with autocast(clips.device, amp_dtype):
        logits, descriptors = model(clips)
        loss, parts = criterion(logits, descriptors, pids)
    scaler.scale(loss).backward()
    return loss.detach(), parts


def _sync(run: Run, asked: bool) -> None:
    """Read the losses back (the run's one host sync); a non-finite loss stops the run, naming
    the remedy; a stop asked for on any rank is taken by all."""
    stopping, bad = run.log.sync(asked)
    if bad is not None:
        raise UserError(f"loss is {bad.loss} at step {bad.step} (epoch {bad.epoch}, batch {bad.batch}); "
                        + run.ckpt.remedy(bad.step))
    run.stopped = run.stopped or stopping


def _save(run: Run, next_epoch: int, next_batch: int) -> None:
    run.log.flush()  # the log is never behind the checkpoint
    run.ckpt.save(run.step, next_epoch, next_batch)


def setup(cfg: TrainConfig, env: Distributed, resume: bool) -> Run:
    """Dataset, loader, model, optimizer, schedule, scaler and loss; the checkpoint loaded when
    resuming; the run folder written once everything is checked."""
    from fastnl.data.datasets import SPLIT_DATASETS, get_dataset, resolve_name
    from fastnl.data.loader import build_train_loader
    from fastnl.losses import ReIDLoss
    from fastnl.model import build_model

    device, master = env.device, env.is_main
    amp_dtype = resolve_amp(cfg.amp, device)
    ckpt = Checkpointer(cfg, amp_dtype=amp_dtype, master=master, world_size=env.world_size)
    state = ckpt.load(resume)
    split = cfg.split_id if resolve_name(cfg.dataset, cfg.root) in SPLIT_DATASETS else None
    dataset = get_dataset(cfg.dataset, cfg.root, split_id=split, verify=cfg.verify)
    if cfg.optimizer == "apex-adam":
        _apex_fused_adam(device)
    try:
        loader = build_train_loader(dataset, frames=cfg.frames, height=cfg.height, width=cfg.width, p=cfg.p,
                                    k=cfg.k, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                                    backend=cfg.loader, workers=cfg.workers, sampling=cfg.sampling,
                                    flip=cfg.flip)
    except ValueError as err:  # e.g. fewer training ids than P
        raise UserError(f"cannot build the training batches: {err}") from None

    if device.type == "cpu":
        # Denormal floats (e.g. Adam's second moments of tiny gradients) slow CPU math ~10x.
        torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    model = build_model(dataset.num_train_pids, **cfg.model_options(), pretrained=cfg.pretrained or None,
                        verbose=master and state is None)
    model.set_grad_checkpointing(cfg.grad_checkpoint)
    if cfg.sync_bn and env.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                device=device)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scaler = grad_scaler(device, amp_dtype)
    ckpt.attach(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                num_classes=dataset.num_train_pids)
    step, epoch, start_batch = ckpt.restore(state) if state is not None else (0, 0, 0)
    out = Path(cfg.out)
    if master:  # everything checked: now the run folder is written
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        for tmp in remove_stale_temp_files(ckpt.path):
            print(f"removed {tmp}, left by a checkpoint write that was interrupted")
        (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(f"training on {device} x {env.world_size} process(es), amp={amp_dtype or 'off'}, "
              f"{dataset.num_train_pids} ids, {len(loader)} batches/epoch, "
              f"{'resuming at epoch %d batch %d' % (epoch, start_batch) if state else 'from scratch'}")
    if env.enabled:
        model = DDP(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    log = RunLog(out, env=env, resume_step=step, tensorboard=cfg.tensorboard, progress=cfg.progress,
                 epochs=cfg.epochs)
    return Run(cfg, env, loader, model, optimizer, scheduler, scaler,
               ReIDLoss(margin=cfg.margin, label_smoothing=cfg.label_smoothing), amp_dtype, ckpt, log,
               step, epoch, start_batch)


def _apex_fused_adam(device: torch.device):
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        raise UserError("--optimizer apex-adam needs NVIDIA apex, which is not installed (it is not on "
                        "the package index: build it from github.com/NVIDIA/apex), or use "
                        "--optimizer adam (torch's fused Adam)") from None
    if device.type != "cuda":
        raise UserError("--optimizer apex-adam runs on CUDA only; use --optimizer adam on CPU")
    return FusedAdam


def build_optimizer(name: str, params, *, lr: float, weight_decay: float, device: torch.device):
    """torch Adam (fused=True on CUDA) or, for ``apex-adam``, NVIDIA apex's FusedAdam."""
    if name == "apex-adam":
        return _apex_fused_adam(device)(params, lr=lr, weight_decay=weight_decay, adam_w_mode=False)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda" or None)


class _StopRequest:
    """SIGTERM/SIGINT (e.g. a cluster pre-emption) -> finish the step, checkpoint, exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
