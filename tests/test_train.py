"""The training loop: DDP gradients, mixed precision, exact kill-and-resume, failures users see.

Everything runs the full SE-ResNet50 model on tiny clips (2 frames of 32x16, P x K = 2 x 2).
"""
import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastnl import cli
from fastnl.checkpoint import load_checkpoint, save_checkpoint
from fastnl.errors import UserError
from fastnl.losses import ReIDLoss
from fastnl.model import build_model
from fastnl.train import TrainConfig, forward_backward, setup_distributed, train

REPO = Path(__file__).resolve().parent.parent
TINY = dict(frames=2, height=32, width=16, p=2, k=2, workers=0, progress=False, tensorboard=False, device="cpu")
TINY_ARGS = ["--frames", "2", "--height", "32", "--width", "16", "--p", "2", "--k", "2", "--workers", "0",
             "--no-progress", "--no-tensorboard", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fastnl.data.synthetic import write_dataset

    # 6 train ids -> 3 batches of P = 2 ids per epoch
    return write_dataset(tmp_path_factory.mktemp("synth") / "data", fmt="mars", ids=12, cams=2, seed=0,
                         size=(32, 16), min_frames=2, max_frames=4)


def _tiny_model():
    torch.manual_seed(0)
    return build_model(4, frames=2, impl="reference", verbose=False)


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 2, 3, 32, 16, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = setup_distributed("cpu")
    assert env.enabled and env.device.type == "cpu" and torch.distributed.get_backend() == "gloo"
    model = _tiny_model().train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    clips, pids = _global_batch()
    shard = slice(rank * 4, (rank + 1) * 4)
    forward_backward(ddp, ReIDLoss(), clips[shard], pids[shard], amp_dtype=None,
                     scaler=torch.amp.GradScaler("cpu", enabled=False))
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_processes_match_one_process(tmp_path):
    """DDP averages the gradients of the ranks' losses: the same as one process that takes the
    mean of the per-shard losses (each shard with its own BatchNorm statistics and triplets)."""
    out = tmp_path / "grads.pt"
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2,
                                          start_method="spawn")
    ddp_grads = torch.load(out, weights_only=True)

    model = _tiny_model().train()
    clips, pids = _global_batch()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for shard in (slice(0, 4), slice(4, 8)):
        forward_backward(model, ReIDLoss(), clips[shard], pids[shard], amp_dtype=None, scaler=scaler)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad / 2, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("backbone.conv1.weight", "classifier.weight"):  # from the first layer to the last
        assert ddp_grads[name].abs().sum() > 0


@pytest.mark.slow
def test_amp_bf16_with_grad_scaler_on_cpu():
    """The GradScaler path under bf16 autocast on CPU, with oneDNN's convolutions off: torch
    2.14's oneDNN bf16 convolution backward reads memory it did not write at the tiny model's
    degenerate layer4 shape (3x3, stride 2, 512 channels, a 2x1 input), so its weight gradient
    is non-finite whenever the heap holds NaN garbage. Reproduced without fastnl: fill and free
    NaN tensors, then ``Conv2d(512, 512, 3, stride=2, padding=1)`` on [16, 512, 2, 1] under
    autocast, backward: 1 of 5 weight gradients non-finite; none with stride 1, at 8x4 or with
    torch.backends.mkldnn off. Run in a fresh interpreter as well."""
    proc = subprocess.run([sys.executable, "-c", "import test_train; test_train._amp_bf16_with_grad_scaler_step()"],
                          cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok"), proc.stdout[-1000:]


def _amp_bf16_with_grad_scaler_step():
    with torch.backends.mkldnn.flags(enabled=False):
        _amp_bf16_with_grad_scaler_checks()


def _amp_bf16_with_grad_scaler_checks():
    clips, pids = _global_batch()
    model = _tiny_model().train()
    with torch.no_grad():
        ref_loss, _ = ReIDLoss()(*model(clips), pids)
    dtypes = []
    model.classifier.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # the fp16 path, here on bf16
    loss, parts = forward_backward(model, ReIDLoss(), clips, pids, amp_dtype=torch.bfloat16, scaler=scaler)
    assert dtypes == [torch.bfloat16], dtypes  # the network ran under autocast
    assert loss.dtype == torch.float32 and torch.isfinite(loss), loss
    assert abs(loss.item() - ref_loss.item()) < 0.05 * ref_loss.item(), (loss.item(), ref_loss.item())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(optimizer)
    bad = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"missing or non-finite gradients: {bad}"
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 1024.0, scaler.get_scale()  # finite gradients: the step was taken
    print("ok")


def _train_cmd(*args):
    return [sys.executable, "-m", "fastnl", "train", *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    common = ["--dataset", "synthetic", "--root", str(data), "--epochs", "1", "--lr", "1e-3", *TINY_ARGS]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    ref = subprocess.Popen(_train_cmd(*common, "--out", str(straight)), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_train_cmd(*common, "--out", str(killed), "--save-every-steps", "1"), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-epoch: the first checkpoint is at batch 1 of 3
    victim.wait()
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 0 and 1 <= state["batch"] < 3, (state["epoch"], state["batch"])
    del state
    resumed = subprocess.run(_train_cmd("--resume", str(killed)), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ref.wait() == 0, ref.stderr.read()[-2000:]

    a, b = load_checkpoint(killed), load_checkpoint(straight)
    assert (a["step"], a["epoch"], a["batch"]) == (b["step"], b["epoch"], b["batch"]) == (3, 1, 0)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    rows = (killed / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]  # no step logged twice
    assert (killed / "training_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_nan_loss_names_a_good_checkpoint_and_resuming_with_a_lower_lr_gets_past_it(
        data, tmp_path, monkeypatch, capsys):
    from fastnl.commands.train import resolve_config

    calls = {"n": 0}
    original = ReIDLoss.forward

    def forward(self, logits, descriptors, targets):
        calls["n"] += 1
        loss, parts = original(self, logits, descriptors, targets)
        return (loss * float("nan") if calls["n"] == 5 else loss), parts

    monkeypatch.setattr(ReIDLoss, "forward", forward)
    run = tmp_path / "run"
    cfg = TrainConfig(dataset="synthetic", root=str(data), out=str(run), epochs=2, save_every=1, lr=1e-3,
                      impl="reference", nlam_blocks=(), **TINY)  # no NLAM: smaller checkpoints, same loop
    # the checkpoint of step 3 gave a finite loss at step 4: it is good
    with pytest.raises(UserError, match=rf"loss is nan at step 5 \(epoch 2, batch 2\); last good checkpoint: "
                                        rf"{run / 'checkpoint.pt'} \(step 3\): continue with --resume {run} "
                                        r"--lr 0.0001"):
        train(cfg)
    monkeypatch.undo()
    # a checkpoint write killed by SIGKILL leaves its temp file: removed at the next start
    stale = run / ".checkpoint.pt.k1ll3d_x.tmp"
    stale.write_bytes(b"\0" * 1000)
    others = [run / ".checkpoint.pt.keep", run / "notes.tmp", tmp_path / ".checkpoint.pt.abcdefgh.tmp"]
    for path in others:
        path.write_text("not ours")
    capsys.readouterr()

    cfg, resume = resolve_config(cli.build_parser().parse_args(["train", "--resume", str(run), "--lr", "1e-4"]))
    assert resume and cfg.lr == 1e-4
    result = train(cfg, resume=True)
    out = capsys.readouterr().out
    assert result["step"] == 6 and math.isfinite(result["loss"])
    assert "resuming with --lr 0.0001 (was 0.001)" in out
    assert f"removed {stale}" in out and not stale.exists() and all(p.exists() for p in others)
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 1e-4
    assert load_checkpoint(run)["config"]["lr"] == 1e-4
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert [(r[0], r[6]) for r in rows] == [("1", "0.001"), ("2", "0.001"), ("3", "0.001"), ("4", "0.0001"),
                                            ("5", "0.0001"), ("6", "0.0001")]


@pytest.mark.slow
def test_a_too_high_lr_names_the_real_remedy_and_no_checkpoint_is_non_finite(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = TrainConfig(dataset="synthetic", root=str(data), out=str(run), epochs=1, save_every_steps=1, lr=1e30,
                      impl="reference", nlam_blocks=(), **TINY)
    # the step-1 checkpoint holds the exploded weights that give the NaN at step 2: not "good"
    with pytest.raises(UserError, match=rf"loss is nan at step 2 .*the last checkpoint, {run / 'checkpoint.pt'} "
                                        r"\(step 1\), holds the weights that gave it, so resuming it with any "
                                        r"--lr repeats it: start again with a lower --lr"):
        train(cfg)
    assert load_checkpoint(run)["step"] == 1

    # weights that turn non-finite are never saved: the checkpoint on disk stays the last finite one
    run2 = tmp_path / "run2"
    step = torch.optim.Adam.step

    def poisoned(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(UserError, match=r"step 2 left non-finite values in the model's backbone.conv1.weight: the "
                                        rf"checkpoint was not written; last good checkpoint: .* \(step 1\)"):
        train(dataclasses.replace(cfg, out=str(run2), lr=1e-3))
    state = load_checkpoint(run2)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values()
                                      if t.is_floating_point())


def test_bad_inputs_are_one_line_errors(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "mars", "--root", str(tmp_path / "nowhere"), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()  # nothing written for a failed start
    with pytest.raises(UserError, match="--k must be >= 2"):
        train(TrainConfig(dataset="synthetic", root=str(data), out=str(run), k=1))
    with pytest.raises(UserError, match="--nlam-blocks"):
        train(TrainConfig(dataset="synthetic", root=str(data), out=str(run), nlam_blocks=(4, 6)))
    with pytest.raises(UserError, match="P=8 identities"):
        train(TrainConfig(dataset="synthetic", root=str(data), out=str(tmp_path / "p8"), **{**TINY, "p": 8}))
    with pytest.raises(UserError, match="apex"):
        train(TrainConfig(dataset="synthetic", root=str(data), out=str(tmp_path / "apex"), optimizer="apex-adam",
                          **TINY))
    assert cli.main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err

    # a config file with an unknown key; and the precedence defaults < file < command line
    from fastnl.commands.train import resolve_config

    parser = cli.build_parser()
    (tmp_path / "bad.yaml").write_text("lr: 0.01\nlearning_rate: 3\n")
    with pytest.raises(UserError, match="unknown option.*learning_rate"):
        resolve_config(parser.parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))
    (tmp_path / "good.yaml").write_text("lr: 0.01\nepochs: 5\nnlam_blocks: [3, 4, 5]\nflip: false\n")
    cfg, resume = resolve_config(parser.parse_args(["train", "--config", str(tmp_path / "good.yaml"),
                                                    "--epochs", "7", "--root", "r", "--out", "o"]))
    assert (cfg.lr, cfg.epochs, cfg.nlam_blocks, cfg.flip, cfg.frames, resume) == (0.01, 7, (3, 4, 5), False, 8, False)

    # resuming may change the schedule length, and on purpose --lr and --amp, but not the rest
    run.mkdir()
    (run / "config.yaml").write_text(f"root: {data}\nout: {run}\ndataset: synthetic\n")
    save_checkpoint({"model": {}}, run / "checkpoint.pt")
    with pytest.raises(UserError, match="cannot change frames, margin"):
        resolve_config(parser.parse_args(["train", "--resume", str(run), "--margin", "1", "--frames", "4"]))
    cfg, resume = resolve_config(parser.parse_args(["train", "--resume", str(run), "--epochs", "3", "--lr", "1",
                                                    "--amp", "off", "--nlam-blocks", "4", "5"]))
    assert resume and (cfg.epochs, cfg.lr, cfg.amp, cfg.nlam_blocks, cfg.out) == (3, 1.0, "off", (4, 5), str(run))
    with pytest.raises(UserError, match="already holds a run"):
        train(TrainConfig(dataset="synthetic", root=str(data), out=str(run)))


def test_checkpoints_are_atomic_and_safe_to_load(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "step": 1}, path)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"refused to load .*evil.pt: it would call posix.system while unpickling") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)  # torch's advice is not passed on
    (tmp_path / "empty.pt").touch()
    with pytest.raises(UserError, match=r"cannot read checkpoint .*empty.pt: the file is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match=r"cannot read checkpoint .*cut.pt \(300 bytes\): RuntimeError: \S+"):
        load_checkpoint(tmp_path / "cut.pt")


CONFIG_CASES = [
    ('flip: "no"', "flip must be true or false, got 'no' (str)"),
    ("frames: 2.7", "frames must be an integer, got 2.7 (float)"),
    ('lr: "fast"', "lr must be a number, got 'fast' (str)"),
    ('frames: "2"', "frames must be an integer, got '2' (str)"),
    ("epochs: [1, 2]", "epochs must be an integer, got [1, 2] (list)"),
    ("nlam_blocks: 4", "nlam_blocks must be a list of integers, got 4 (int)"),
    ("nlam_blocks: [4, 4]", "nlam_blocks must be distinct blocks among 1 2 3 4 5, got [4, 4]"),
    ("lr_gamma: -1", "lr_gamma must be in (0, 1]"),
    ("lr: .nan", "lr must be a finite number, got nan"),
    ("sampling: every", "sampling must be one of restricted, random, got 'every'"),
]


@pytest.mark.parametrize("text,expected", CONFIG_CASES)
def test_config_file_values_are_type_checked_before_anything_is_written(data, tmp_path, capsys, text, expected):
    (tmp_path / "c.yaml").write_text(text + "\n")
    run = tmp_path / "run"
    code = cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--dataset", "synthetic", "--root", str(data),
                     "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"fastnl train: error: {tmp_path / 'c.yaml'}: {expected}")
    assert not run.exists()


@pytest.mark.parametrize("args,expected", [
    (["--lr-gamma", "-1"], "--lr-gamma (lr_gamma) must be in (0, 1]"),
    (["--nlam-scale", "nan"], "--nlam-scale (nlam_scale) must be a finite number, got nan"),
    (["--label-smoothing", "5"], "--label-smoothing (label_smoothing) must be in [0, 1], got 5.0"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
])
def test_option_values_are_range_checked_before_anything_is_written(data, tmp_path, capsys, args, expected):
    run = tmp_path / "run"
    code = cli.main(["train", "--dataset", "synthetic", "--root", str(data), "--out", str(run), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not run.exists()


def test_yaml_numbers_and_bools_as_users_write_them(tmp_path):
    from fastnl.commands.train import resolve_config

    (tmp_path / "c.yaml").write_text("lr: 1e-4\nweight_decay: 5e-4\nmargin: 1\nflip: no\nnlam_blocks:\n"
                                     "pretrained:\n")
    cfg, _ = resolve_config(cli.build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    assert (cfg.lr, cfg.weight_decay, cfg.margin, cfg.flip, cfg.nlam_blocks, cfg.pretrained) == \
        (1e-4, 5e-4, 1.0, False, (), "")
    assert isinstance(cfg.margin, float)


def test_resume_into_a_checkpoint_that_does_not_fit_its_config(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"root: {data}\nout: {run}\ndataset: synthetic\nframes: 2\nheight: 32\n"
                                     "width: 16\np: 2\nk: 2\nworkers: 0\ndevice: cpu\nimpl: reference\n")
    save_checkpoint({"model": {"fc.weight": torch.zeros(2)}, "step": 1}, run / "checkpoint.pt")
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastnl train: error: checkpoint {run / 'checkpoint.pt'} does not fit "
                                               "the run's config.yaml (Error(s) in loading state_dict")
    assert "start a new run with another --out" in err[0]
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.yaml"]  # nothing written


def test_verify_finds_a_corrupt_frame_before_training(data, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    frame = sorted((root / "bbox_train").rglob("*.jpg"))[3]
    frame.write_bytes(frame.read_bytes()[:40])  # truncated JPEG
    run = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--root", str(root), "--out", str(run), "--verify"]
    assert cli.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the reader's junk-id warning
    assert last.startswith("fastnl train: error:") and str(frame) in last
    assert not (run / "checkpoint.pt").exists()


def test_long_aliases_of_p_and_k_for_torchrun():
    """torchrun takes a bare `--p` for an abbreviation of its own options: the aliases avoid it."""
    from fastnl.commands.train import resolve_config

    args = cli.build_parser().parse_args(["train", "--root", "r", "--out", "o", "--ids-per-batch", "6",
                                          "--tracklets-per-id", "3"])
    cfg, _ = resolve_config(args)
    assert (cfg.p, cfg.k) == (6, 3)


@pytest.mark.slow
def test_trains_on_an_ilidsvid_split(tmp_path):
    """--dataset ilidsvid --split-id N trains on that split's training identities."""
    from fastnl.data.datasets import ILIDSVID
    from fastnl.data.synthetic import write_dataset

    root = write_dataset(tmp_path / "ilids", fmt="ilidsvid", ids=8, seed=0, size=(32, 16), min_frames=2, max_frames=4)
    out = tmp_path / "run"
    proc = subprocess.run(_train_cmd("--dataset", "ilidsvid", "--root", str(root), "--split-id", "3", "--epochs", "1",
                                     "--out", str(out), *TINY_ARGS), capture_output=True, text=True, timeout=600,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "split_id: 3" in config and "dataset: ilidsvid" in config
    from fastnl.checkpoint import load_checkpoint

    train_pids = {pid for _, pid, _ in ILIDSVID(root, split_id=3).train}
    assert load_checkpoint(out / "checkpoint.pt")["num_classes"] == len(train_pids) == 4
    bad = subprocess.run(_train_cmd("--dataset", "ilidsvid", "--root", str(root), "--split-id", "10", "--epochs", "1",
                                    "--out", str(tmp_path / "bad"), *TINY_ARGS), capture_output=True, text=True,
                         timeout=300, env=_env())
    assert bad.returncode != 0 and "split id 10 out of range" in bad.stderr and not (tmp_path / "bad").exists()
