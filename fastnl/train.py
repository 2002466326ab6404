"""Training loop for the paper's network (section 4.2): CE + batch-hard triplet, Adam, step decay.

One function, :func:`train`, runs the whole loop on one CPU, one GPU, or many GPUs on many
machines under ``torchrun`` (DDP: NCCL on GPU, gloo on CPU). What happens at each step is in
plain sight there: autocast (bf16/fp16), GradScaler for fp16, the optimizer step, the NaN/Inf
check, logging (tqdm, CSV, TensorBoard when installed) and atomic checkpoints carrying the
model, optimizer, scaler, scheduler, RNG state and the (epoch, batch) position, so that
``--resume`` continues exactly where a run stopped, mid-epoch included.

The defaults of :class:`TrainConfig` are the paper's: N = 8 frames at 256x128, P x K = 8 x 4,
Adam lr 1e-4 multiplied by 0.1 every 200 epochs, 800 epochs, triplet margin 0.3.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fastnl.checkpoint import load_checkpoint, one_line, remove_stale_temp_files, save_checkpoint
from fastnl.data.sampling import SAMPLING_MODES
from fastnl.errors import UserError
from fastnl.runtime import (AMP_CHOICES, AMP_DTYPES, DEVICES, Distributed, autocast, grad_scaler,  # noqa: F401
                            resolve_amp, setup_distributed)
from fastnl.vocabulary import LOADERS, MODEL_IMPLS

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.csv"
CURVE_FILE = "training_curve.png"
LOG_FIELDS = ("step", "epoch", "batch", "loss", "ce", "triplet", "lr", "clips_per_s", "time_s")
MEMORY_ADVICE = ("reduce memory with --grad-checkpoint, --amp bf16, --impl fused, fewer --frames, "
                 "or a smaller --p or --k (clips per GPU = P x K)")


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every knob of ``fastnl train``; the field names are the option names (``--lr-step``) and
    the keys of a ``--config`` YAML file (``lr_step``)."""

    # data
    dataset: str = _opt("mars", "dataset reader (synthetic: any fastnl synth tree)",
                        choices=("mars", "dukevideo", "ilidsvid", "prid2011", "synthetic"))
    root: str = _opt("", "dataset folder")
    split_id: int = _opt(0, "train/test split of ilidsvid and prid2011 (0..9); mars and dukevideo have one")
    verify: bool = _opt(False, "decode every frame of the dataset at start-up (finds corrupt JPEGs early)")
    out: str = _opt("", "run folder: config, checkpoint, logs and plots are written here")
    frames: int = _opt(8, "frames per training clip (N), drawn at random from the tracklet")
    height: int = _opt(256, "frame height")
    width: int = _opt(128, "frame width")
    # Long aliases: torchrun reads a bare `--p` as an abbreviation of its own options.
    p: int = _opt(8, "identities per batch (P)", aliases=("--ids-per-batch",))
    k: int = _opt(4, "tracklets per identity (K); each process takes P x K clips per step",
                  aliases=("--tracklets-per-id",))
    sampling: str = _opt("restricted", "frame sampling of the data loader", choices=SAMPLING_MODES)
    flip: bool = _opt(True, "random horizontal flips")
    loader: str = _opt("torch", "data loading backend", choices=LOADERS)
    workers: int = _opt(4, "data loading workers per process")
    # model (paper Tables 3-6)
    nlam_blocks: tuple = _opt((4, 5), "blocks (1-5) followed by an NLAM; empty for none")
    temporal: str = _opt("nltp", "temporal aggregation: NLTP or plain temporal average",
                         choices=("nltp", "avg"))
    impl: str = _opt("fused", "NLAM implementation", choices=MODEL_IMPLS)
    nlam_scale: float = _opt(1.0, "scale of A^T B inside the NLAM softmax (the paper uses 1)")
    nlam_reduction: int = _opt(16, "channel attention reduction ratio r")
    pretrained: str = _opt("", "local file of ImageNet SE-ResNet50 weights (nothing is downloaded)")
    # optimisation (paper section 4.2)
    epochs: int = _opt(800, "training epochs")
    lr: float = _opt(1e-4, "Adam learning rate")
    lr_step: int = _opt(200, "multiply the learning rate by --lr-gamma every this many epochs")
    lr_gamma: float = _opt(0.1, "learning rate decay factor")
    weight_decay: float = _opt(0.0, "Adam weight decay")
    margin: float = _opt(0.3, "triplet loss margin m")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    optimizer: str = _opt("adam", "adam: torch Adam (fused on CUDA); apex-adam: NVIDIA apex FusedAdam",
                          choices=("adam", "apex-adam"))
    # speed and memory
    amp: str = _opt("auto", "autocast dtype; auto = bf16 on CUDA, off on CPU",
                    choices=AMP_CHOICES)
    grad_checkpoint: bool = _opt(False, "recompute backbone stages in backward (less memory)")
    channels_last: bool = _opt(False, "channels-last memory format")
    sync_bn: bool = _opt(False, "synchronise BatchNorm statistics across DDP processes")
    device: str = _opt("auto", "auto, cpu or cuda", choices=DEVICES)
    # run
    seed: int = _opt(0, "seed of the initialisation and of the data order")
    save_every: int = _opt(50, "write the checkpoint every this many epochs (and at the end)")
    save_every_steps: int = _opt(0, "also write it every this many steps (0: off)")
    max_minutes: float = _opt(0.0, "stop cleanly after this many minutes, resumable (0: no limit)")
    tensorboard: bool = _opt(True, "write TensorBoard logs when tensorboard is installed")
    progress: bool = _opt(True, "show a progress bar")

    def check_values(self, key=None) -> None:
        """Every value has its field's type (a YAML ``flip: "no"`` is a string, not false;
        ``frames: 2.7`` is not an integer) and lies in its range; a number given for a float
        field becomes a float, a list of blocks a tuple. Raises :class:`UserError` naming the
        option (as ``key(name)`` gives it: by default its flag), the value and what is expected."""
        key = key or _key
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "bool":
                ok, expected = isinstance(value, bool), "true or false"
            elif kind == "int":
                ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif kind == "float":
                ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
                if ok:
                    try:
                        value = float(value)
                    except OverflowError:  # an integer beyond the float range
                        value = math.inf
                    ok, expected = math.isfinite(value), "a finite number"
            elif kind == "str":
                value = "" if value is None and f.default == "" else value  # `pretrained:` in YAML
                ok, expected = isinstance(value, str), "a string"
            elif kind == "tuple":  # nlam_blocks
                value = () if value is None else value
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(b, int) and not isinstance(b, bool) for b in value)
                expected = "a list of integers"
                if ok:
                    value = tuple(value)
            else:  # a field type this check does not know: keep the value as it is
                ok, expected = True, ""
            if not ok:
                raise UserError(f"{key(f.name)} must be {expected}, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, f.name, value)

        positive = ("frames", "height", "width", "p", "k", "epochs", "lr_step", "save_every", "nlam_reduction")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{key(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "save_every_steps", "seed", "split_id", "max_minutes", "weight_decay", "margin",
                     "label_smoothing"):
            if getattr(self, name) < 0:
                raise UserError(f"{key(name)} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"{key('lr')} must be a positive number, got {self.lr}")
        if not 0 < self.lr_gamma <= 1:
            raise UserError(f"{key('lr_gamma')} must be in (0, 1] (the learning rate is multiplied by it "
                            f"every lr_step epochs), got {self.lr_gamma}")
        if not self.label_smoothing <= 1:
            raise UserError(f"{key('label_smoothing')} must be in [0, 1], got {self.label_smoothing}")
        if not self.nlam_scale > 0:
            raise UserError(f"{key('nlam_scale')} must be a positive number, got {self.nlam_scale}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"{key(f.name)} must be one of {', '.join(choices)}, "
                                f"got {getattr(self, f.name)!r}")
        bad = [b for b in self.nlam_blocks if b not in (1, 2, 3, 4, 5)]
        if bad or len(set(self.nlam_blocks)) != len(self.nlam_blocks):
            raise UserError(f"{key('nlam_blocks')} must be distinct blocks among 1 2 3 4 5, got {list(self.nlam_blocks)}")
        if self.k < 2:
            raise UserError(f"{key('k')} must be >= 2: the triplet loss needs two tracklets per identity, got {self.k}")

    def validate(self) -> None:
        """:meth:`check_values`, and the options a run needs (``root``, ``out``)."""
        self.check_values()
        if not self.root:
            raise UserError("--root is required: the dataset folder")
        if not self.out:
            raise UserError("--out is required: the run folder")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["nlam_blocks"] = list(self.nlam_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "options") -> TrainConfig:
        """The config of the option values ``d``, checked; ``source`` is "options" or the file
        they come from (messages then name its keys)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        cfg = cls(**d)
        if source == "options":
            cfg.check_values()
        else:  # a file: name its keys
            try:
                cfg.check_values(key=lambda name: name)
            except UserError as err:
                raise UserError(f"{source}: {err}") from None
        return cfg


def _key(name: str) -> str:
    """How an option is named in messages: its flag, and its config-file key when that differs."""
    flag = "--" + name.replace("_", "-")
    return flag if "_" not in name else f"{flag} ({name})"


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


def forward_backward(model, criterion, clips, pids, *, amp_dtype, scaler):
    """One forward and backward pass; returns (loss, {"ce", "triplet"}) detached."""
    with autocast(clips.device, amp_dtype):
        logits, descriptors = model(clips)
        loss, parts = criterion(logits, descriptors, pids)
    scaler.scale(loss).backward()
    return loss.detach(), parts


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


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


def _first_nonfinite(model: torch.nn.Module, optimizer) -> str | None:
    """The name of the first model tensor or optimizer state holding a NaN or an Inf, or None.
    One pass over each tensor (its min and max are finite iff all of it is), one sync."""
    named = [(f"the model's {name}", t) for name, t in model.state_dict().items()]
    named += [(f"the optimizer's {key}", v) for st in optimizer.state.values() for key, v in st.items()
              if torch.is_tensor(v)]
    named = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    with torch.no_grad():
        extremes = torch.stack([torch.stack(torch.aminmax(t.detach())).float().to(named[0][1].device)
                                for _, t in named])
        finite = torch.isfinite(extremes).all(dim=1).cpu()
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def _nan_remedy(cfg: TrainConfig, out: Path, ckpt_path: Path, saved_step, failed_step: int, amp_dtype) -> str:
    """What to do after a non-finite loss (or weights) at ``failed_step``, given the step of the
    checkpoint on disk (None: none). A checkpoint is "good" when a later step computed a finite
    loss from its weights; the one written right before the failing step holds the very weights
    that failed, so resuming it with any --lr repeats the failure (another --amp may not)."""
    lower = f"--lr {cfg.lr / 10:g}"
    amp = {torch.float16: "--amp bf16 or --amp off", torch.bfloat16: "--amp off"}.get(amp_dtype)
    if saved_step is not None and saved_step < failed_step - 1:
        return (f"last good checkpoint: {ckpt_path} (step {saved_step}): continue with --resume {out} "
                f"{lower}" + (f" (or {amp})" if amp else "") + " (a resumed run may change --lr and --amp)")
    fresh = f"start again with a lower --lr (another --out, or remove {out})"
    if saved_step is None:
        return "no checkpoint was written before it: " + fresh + (f", or use {amp}" if amp else "")
    return (f"the last checkpoint, {ckpt_path} (step {saved_step}), holds the weights that gave it, so "
            "resuming it with any --lr repeats it: " + fresh
            + (f"; or --resume {out} with {amp}" if amp else ""))


def _load_run_state(state: dict, ckpt_path: Path, cfg: TrainConfig, model, optimizer, scheduler, scaler,
                    master: bool) -> None:
    """Load a checkpoint into a freshly built run; a checkpoint that does not fit the run's config is
    one line. --lr and --amp may differ from the checkpoint's: the new base learning rate takes
    over from the current epoch's point of the schedule, and the change is printed."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") or not scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])  # a scaler enabled by a change to --amp fp16 starts afresh
        set_rng_state(state["rng"])
        for key in ("step", "epoch", "batch"):
            int(state[key])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        raise UserError(f"checkpoint {ckpt_path} does not fit the run's {CONFIG_FILE} ({one_line(err)}); "
                        "resume it with the config it was written with, or start a new run with another "
                        "--out") from None
    old = state.get("config") or {}
    if "lr" in old and float(old["lr"]) != cfg.lr:
        factor = cfg.lr_gamma ** (int(state["epoch"]) // cfg.lr_step)
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * factor
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if master:
            print(f"resuming with --lr {cfg.lr:g} (was {float(old['lr']):g}): learning rate now "
                  f"{optimizer.param_groups[0]['lr']:g}; recorded in {CONFIG_FILE}")
    if "amp" in old and old["amp"] != cfg.amp and master:
        print(f"resuming with --amp {cfg.amp} (was {old['amp']}); recorded in {CONFIG_FILE}")


def _open_log(out: Path, resume_step: int):
    """The CSV log, with any rows past ``resume_step`` (written after the last checkpoint) dropped."""
    path = out / LOG_FILE
    rows = []
    if resume_step and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def _tensorboard(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def plot_training_curve(log_csv: Path, png: Path) -> Path | None:
    """Loss (total, CE, triplet) and learning rate against the step, from the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in ("loss", "ce", "triplet"):
        ax.plot(step, [float(r[key]) for r in rows], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(step, [float(r["lr"]) for r in rows], "k--", lw=1, label="lr")
    ax2.set_ylabel("learning rate")
    ax2.set_yscale("log")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title(f"training curve ({log_csv.parent.name})")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train (or resume) the run in ``cfg.out``. Returns {"step", "epoch", "checkpoint", "loss"}."""
    from tqdm import tqdm

    from fastnl.data.datasets import SPLIT_DATASETS, get_dataset, resolve_name
    from fastnl.data.loader import build_train_loader
    from fastnl.losses import ReIDLoss
    from fastnl.model import build_model

    cfg.validate()
    env = setup_distributed(cfg.device)
    device, master = env.device, env.is_main
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_FILE
    try:
        state = load_checkpoint(ckpt_path) if resume else None
        if not resume and ckpt_path.exists():
            raise UserError(f"{out} already holds a run ({ckpt_path.name}): continue it with --resume {out}, "
                            "or choose another --out")
        split = cfg.split_id if resolve_name(cfg.dataset, cfg.root) in SPLIT_DATASETS else None
        dataset = get_dataset(cfg.dataset, cfg.root, split_id=split, verify=cfg.verify)
        amp_dtype = resolve_amp(cfg.amp, device)
        if cfg.optimizer == "apex-adam":
            _apex_fused_adam(device)
        try:
            loader = build_train_loader(dataset, frames=cfg.frames, height=cfg.height, width=cfg.width,
                                        p=cfg.p, k=cfg.k, seed=cfg.seed, rank=env.rank,
                                        world_size=env.world_size, backend=cfg.loader, workers=cfg.workers,
                                        sampling=cfg.sampling, flip=cfg.flip)
        except ValueError as err:  # e.g. fewer training ids than P
            raise UserError(f"cannot build the training batches: {err}") from None
        batches = len(loader)

        if device.type == "cpu":
            # Denormal floats (e.g. Adam's second moments of tiny gradients) slow CPU math ~10x.
            torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)
        model = build_model(dataset.num_train_pids, frames=cfg.frames, nlam_blocks=cfg.nlam_blocks,
                            temporal=cfg.temporal, impl=cfg.impl, pretrained=cfg.pretrained or None,
                            nlam_scale=cfg.nlam_scale, nlam_reduction=cfg.nlam_reduction,
                            verbose=master and state is None)
        model.set_grad_checkpointing(cfg.grad_checkpoint)
        if cfg.sync_bn and env.enabled:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr,
                                    weight_decay=cfg.weight_decay, device=device)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        scaler = grad_scaler(device, amp_dtype)
        criterion = ReIDLoss(margin=cfg.margin, label_smoothing=cfg.label_smoothing)

        step, epoch, start_batch = 0, 0, 0
        if state is not None:
            _load_run_state(state, ckpt_path, cfg, model, optimizer, scheduler, scaler, master)
            step, epoch, start_batch = state["step"], state["epoch"], state["batch"]
        if master:  # everything checked: now the run folder is written
            out.mkdir(parents=True, exist_ok=True)
            for tmp in remove_stale_temp_files(ckpt_path):
                print(f"removed {tmp}, left by a checkpoint write that was interrupted")
            import yaml

            (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        raw_model = model
        if env.enabled:
            model = DDP(model, device_ids=[env.local_rank] if device.type == "cuda" else None)

        saved_step = step if state is not None else None  # the step of the checkpoint on disk

        def save(next_epoch: int, next_batch: int) -> None:
            nonlocal saved_step
            bad = _first_nonfinite(raw_model, optimizer)
            if bad is not None:
                raise UserError(f"step {step} left non-finite values in {bad}: the checkpoint was not written; "
                                + _nan_remedy(cfg, out, ckpt_path, saved_step, step + 1, amp_dtype))
            if master:
                log_file.flush()  # the log is never behind the checkpoint
                save_checkpoint({
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_state(), "step": step, "epoch": next_epoch, "batch": next_batch,
                    "config": cfg.to_dict(), "num_classes": dataset.num_train_pids,
                    "world_size": env.world_size,
                }, ckpt_path)
            saved_step = step

        if master:
            print(f"training on {device} x {env.world_size} process(es), amp={amp_dtype or 'off'}, "
                  f"{dataset.num_train_pids} ids, {batches} batches/epoch, "
                  f"{'resuming at epoch %d batch %d' % (epoch, start_batch) if state else 'from scratch'}")
        log_file, log = _open_log(out, step) if master else (None, None)
        tb = _tensorboard(out, cfg.tensorboard) if master else None
        loss_value = float("nan")
        t_start = time.perf_counter()
        stopping = False  # a SIGTERM/SIGINT seen by any rank, or --max-minutes reached
        with _StopRequest() as stop:
            while epoch < cfg.epochs:
                loader.set_epoch(epoch, start_batch)
                bar = tqdm(total=batches, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           disable=not (master and cfg.progress), dynamic_ncols=True, leave=False)
                model.train()
                stopped = False
                for batch, (clips, pids, _camids) in enumerate(loader, start=start_batch):
                    t0 = time.perf_counter()
                    clips = clips.to(device, non_blocking=True)
                    pids = pids.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        loss, parts = forward_backward(model, criterion, clips, pids,
                                                       amp_dtype=amp_dtype, scaler=scaler)
                        scaler.step(optimizer)
                        scaler.update()
                    except torch.OutOfMemoryError as err:
                        raise UserError(f"out of memory at step {step + 1} with {clips.shape[0]} clips x "
                                        f"{cfg.frames} frames at {cfg.height}x{cfg.width}: {MEMORY_ADVICE}") from err
                    step += 1
                    # the numbers every rank agrees on: mean losses and whether to stop
                    out_of_time = cfg.max_minutes and time.perf_counter() - t_start > 60 * cfg.max_minutes
                    stats = torch.stack([loss.float(), parts["ce"].float(), parts["triplet"].float(),
                                         torch.tensor(float(stop.requested or out_of_time), device=device)])
                    if env.enabled:
                        dist.all_reduce(stats)
                        stats /= env.world_size
                    loss_value, ce, tri, stop_flag = stats.tolist()
                    stopping = stop_flag > 0
                    if not math.isfinite(loss_value):
                        raise UserError(f"loss is {loss_value} at step {step} (epoch {epoch + 1}, batch "
                                        f"{batch + 1}); " + _nan_remedy(cfg, out, ckpt_path, saved_step, step,
                                                                        amp_dtype))
                    dt = time.perf_counter() - t0
                    lr = optimizer.param_groups[0]["lr"]
                    clips_per_s = clips.shape[0] * env.world_size / dt
                    if master:
                        log.writerow({"step": step, "epoch": epoch + 1, "batch": batch + 1,
                                      "loss": f"{loss_value:.6g}", "ce": f"{ce:.6g}", "triplet": f"{tri:.6g}",
                                      "lr": f"{lr:.6g}", "clips_per_s": f"{clips_per_s:.4g}",
                                      "time_s": f"{time.perf_counter() - t_start:.2f}"})
                        if tb is not None:
                            for key, value in (("loss", loss_value), ("ce", ce), ("triplet", tri), ("lr", lr),
                                               ("clips_per_s", clips_per_s)):
                                tb.add_scalar(f"train/{key}", value, step)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", clips_s=f"{clips_per_s:.1f}")
                    bar.update()
                    last_batch = batch + 1 == batches
                    if stopping and not last_batch:
                        save(epoch, batch + 1)
                        stopped = True
                        break
                    if cfg.save_every_steps and step % cfg.save_every_steps == 0 and not last_batch:
                        save(epoch, batch + 1)
                bar.close()
                if stopped:
                    break
                start_batch = 0
                epoch += 1
                scheduler.step()
                if epoch % cfg.save_every == 0 or epoch == cfg.epochs or stopping or (
                        cfg.save_every_steps and step % cfg.save_every_steps == 0):
                    save(epoch, 0)
                if master:
                    log_file.flush()
                    print(f"epoch {epoch}/{cfg.epochs}  step {step}  loss {loss_value:.4f}  "
                          f"lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
                if stopping:
                    break
        if master:
            log_file.close()
            if tb is not None:
                tb.close()
            if stopping:
                print(f"stopped after step {step} by a signal or --max-minutes; checkpoint "
                      f"{ckpt_path}; continue with --resume {out}")
            plot_training_curve(out / LOG_FILE, out / CURVE_FILE)
        return {"step": step, "epoch": epoch, "checkpoint": str(ckpt_path), "loss": loss_value,
                "stopped": stopping}
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()
