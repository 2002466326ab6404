"""`fastnl train`: the options are the fields of :class:`fastnl.train.TrainConfig`.

Precedence: the paper's defaults < ``--config FILE`` (YAML, keys = option names with ``_``)
< options on the command line. ``--resume RUN_DIR`` reads RUN_DIR/config.yaml; only options
that do not change the result (epochs, checkpoint frequency, workers, logging) may differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

NAME = "train"
HELP = ("Train the paper's network (defaults: N=8 at 256x128, P x K = 8 x 4, Adam lr 1e-4 x0.1 every "
        "200 epochs, 800 epochs). Multi-GPU: launch with torchrun.")

# Options that may change when a run is resumed without changing what it computes.
RESUMABLE = {"verify", "epochs", "save_every", "save_every_steps", "max_minutes", "workers", "progress", "tensorboard"}


def add_arguments(parser) -> None:
    from fastnl.train import TrainConfig

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


def _read_yaml(path: Path) -> dict:
    import yaml

    from fastnl.errors import UserError

    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(args):
    """(TrainConfig, resume?) from the parsed arguments."""
    from fastnl.errors import UserError
    from fastnl.train import CONFIG_FILE, TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        given = {**_read_yaml(Path(args.config)), **given}
    if not args.resume:
        cfg = TrainConfig.from_dict(given, source=args.config or "options")
        return cfg, False
    run = Path(args.resume)
    saved = _read_yaml(run / CONFIG_FILE) if run.is_dir() else None
    if saved is None:
        raise UserError(f"--resume: run folder not found: {run}")
    cfg = TrainConfig.from_dict(saved, source=str(run / CONFIG_FILE))
    changed = {k: v for k, v in given.items() if k != "out" and v != getattr(cfg, k)}
    fixed = sorted(set(changed) - RESUMABLE)
    if fixed:
        raise UserError(f"--resume {run}: cannot change {', '.join(fixed)} of a run "
                        f"(only {', '.join(sorted(RESUMABLE))}); start a new run with another --out")
    return dataclasses.replace(TrainConfig.from_dict({**saved, **changed}), out=str(run)), True


def run(args) -> int:
    from fastnl.train import train

    cfg, resume = resolve_config(args)
    result = train(cfg, resume=resume)
    if not result["stopped"] and os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"done: {result['step']} steps, {result['epoch']} epochs, final loss {result['loss']:.4f}; "
              f"checkpoint {result['checkpoint']}")
    return 0
