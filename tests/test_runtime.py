"""The one place that decides the device, the AMP dtype, autocast and the GradScaler, and the
ops' vocabulary that every layer shares."""
import pytest
import torch

from fastnl import ops, runtime, vocabulary
from fastnl.errors import UserError


def test_devices_resolve_or_name_the_option():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(None) == runtime.resolve_device("auto") == runtime.default_device()
    with pytest.raises(UserError, match=r"--device must be auto, cpu or cuda\[:index\], got 'gpu'"):
        runtime.resolve_device("gpu")
    with pytest.raises(UserError, match="--device must be"):
        runtime.resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda:1 was given but no CUDA device is visible"):
            runtime.resolve_device("cuda:1")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            runtime.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_amp_dtypes_autocast_and_the_grad_scaler():
    assert runtime.resolve_amp("auto", "cpu") is None
    assert runtime.resolve_amp("off", "cpu") is None
    assert runtime.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert runtime.resolve_amp("fp16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, fp16, off, got 'fp8'"):
        runtime.resolve_amp("fp8", "cpu")
    a = torch.ones(4, 4)
    with runtime.autocast("cpu", torch.bfloat16):
        assert (a @ a).dtype is torch.bfloat16
    with runtime.autocast(torch.device("cpu"), None):
        assert (a @ a).dtype is torch.float32
    assert runtime.grad_scaler("cpu", torch.float16).is_enabled()
    assert not runtime.grad_scaler("cpu", torch.bfloat16).is_enabled()
    assert not runtime.grad_scaler("cpu", None).is_enabled()


def test_one_vocabulary_for_every_layer():
    from fastnl.attention_chunked import ROWWISE
    from fastnl.attention_engines import ENGINES
    from fastnl.commands.check import resolve_device
    from fastnl.model.nlam import IMPLS
    from fastnl.train import TrainConfig

    assert ops.ATTENTION_BACKENDS is vocabulary.ATTENTION_BACKENDS
    assert ops.TRITON_MAX_HEAD_DIM == vocabulary.TRITON_MAX_HEAD_DIM == 1024
    assert IMPLS is vocabulary.MODEL_IMPLS and ENGINES is vocabulary.ATTENTION_ENGINES
    assert ROWWISE is vocabulary.ROWWISE
    assert set(vocabulary.ATTENTION_ENGINES) <= set(vocabulary.ATTENTION_BACKENDS)
    choices = {f.name: f.metadata.get("choices") for f in __import__("dataclasses").fields(TrainConfig)}
    assert choices["impl"] == vocabulary.MODEL_IMPLS and choices["amp"] == runtime.AMP_CHOICES
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("d,ok", [(16, True), (48, True), (1024, True), (1040, False), (20, False), (0, False)])
def test_triton_head_dim_rule(d, ok):
    assert vocabulary.triton_head_dim_ok(d) is ok


def test_interpreter_flag_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert vocabulary.triton_interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not vocabulary.triton_interpreted()
    monkeypatch.delenv("TRITON_INTERPRET")
    vocabulary.request_triton_interpreter()
    assert vocabulary.triton_interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vocabulary.request_triton_interpreter()  # the environment's choice stands
    assert not vocabulary.triton_interpreted()
