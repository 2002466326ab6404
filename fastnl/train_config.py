"""The options of a training run: :class:`TrainConfig`, whose fields are ``fastnl train``'s
options (``--lr-step``) and the keys of a ``--config`` YAML file (``lr_step``).

The defaults are the paper's (section 4.2): N = 8 frames at 256x128, P x K = 8 x 4, Adam lr 1e-4
multiplied by 0.1 every 200 epochs, 800 epochs, triplet margin 0.3.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fastnl.data.sampling import SAMPLING_MODES
from fastnl.errors import UserError
from fastnl.runtime import AMP_CHOICES, DEVICES
from fastnl.vocabulary import LOADERS, MODEL_IMPLS

CONFIG_FILE = "config.yaml"


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
    log_every: int = _opt(10, "read the losses back from the device every this many steps (one host "
                          "sync; the CSV log keeps a row per step)")

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

        positive = ("frames", "height", "width", "p", "k", "epochs", "lr_step", "save_every", "nlam_reduction",
                    "log_every")
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

    def model_options(self) -> dict:
        """The keyword arguments of :func:`fastnl.model.build_model` this config describes."""
        return dict(nlam_blocks=self.nlam_blocks, temporal=self.temporal, impl=self.impl,
                    nlam_scale=self.nlam_scale, nlam_reduction=self.nlam_reduction)

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
