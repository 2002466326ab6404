"""`fastnl train`: the options are the fields of :class:`fastnl.train_config.TrainConfig`.

Precedence: the paper's defaults < ``--config FILE`` (YAML, keys = option names with ``_``)
< options on the command line. ``--resume RUN_DIR`` reads RUN_DIR/config.yaml; only options
that do not change the result (epochs, checkpoint frequency, workers, logging) may differ, and
--lr and --amp, the remedies of a NaN loss (the change is printed and recorded in config.yaml).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path

NAME = "train"
HELP = ("Train the paper's network (defaults: N=8 at 256x128, P x K = 8 x 4, Adam lr 1e-4 x0.1 every "
        "200 epochs, 800 epochs). Multi-GPU: launch with torchrun.")

# Options that may change when a run is resumed without changing what it computes.
RESUMABLE = {"verify", "epochs", "save_every", "save_every_steps", "max_minutes", "workers", "progress", "tensorboard",
             "log_every"}
# Options that change what the rest of a run computes but may be changed on purpose when it is
# resumed, e.g. to get past a NaN loss; train() prints the change and config.yaml records it.
RESUME_OVERRIDES = {"lr", "amp"}


def add_arguments(parser) -> None:
    from fastnl.train_config import TrainConfig

    parser.add_argument("--config", metavar="FILE", help="YAML file whose keys are these options")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"default": argparse.SUPPRESS, "dest": f.name}
        text = f.metadata["help"]
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kw.update(nargs="*", type=int, metavar="BLOCK")
        else:
            kw["type"] = type(f.default)
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kw["help"] = f"{text} (default: {shown})" if shown not in ("", None) else text
        parser.add_argument(flag, *f.metadata.get("aliases", ()), **kw)


def _yaml_loader():
    """yaml.SafeLoader that also reads ``1e-4`` as a number (YAML 1.1, PyYAML's dialect, wants
    ``1.0e-4`` and reads ``1e-4`` as a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return Loader


def _read_yaml(path: Path) -> dict:
    import yaml

    from fastnl.errors import UserError

    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_yaml_loader()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(args):
    """(TrainConfig, resume?) from the parsed arguments."""
    from fastnl.errors import UserError
    from fastnl.train_config import CONFIG_FILE, TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        from_file = _read_yaml(Path(args.config))
        TrainConfig.from_dict(from_file, source=args.config)  # its own values, named as its keys
        given = {**from_file, **given}
    if not args.resume:
        return TrainConfig.from_dict(given, source="options"), False
    run = Path(args.resume)
    saved = _read_yaml(run / CONFIG_FILE) if run.is_dir() else None
    if saved is None:
        raise UserError(f"--resume: run folder not found: {run}")
    cfg = TrainConfig.from_dict(saved, source=str(run / CONFIG_FILE))
    wanted = TrainConfig.from_dict({**saved, **given}, source="options")
    changed = {k: getattr(wanted, k) for k in given if k != "out" and getattr(wanted, k) != getattr(cfg, k)}
    fixed = sorted(set(changed) - RESUMABLE - RESUME_OVERRIDES)
    if fixed:
        raise UserError(f"--resume {run}: cannot change {', '.join(fixed)} of a run "
                        f"(only {', '.join(sorted(RESUMABLE | RESUME_OVERRIDES))}); start a new run with "
                        "another --out")
    return dataclasses.replace(cfg, **changed, out=str(run)), True


def run(args) -> int:
    from fastnl.train import train

    cfg, resume = resolve_config(args)
    result = train(cfg, resume=resume)
    if not result["stopped"] and os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"done: {result['step']} steps, {result['epoch']} epochs, final loss {result['loss']:.4f}; "
              f"checkpoint {result['checkpoint']}")
    return 0
