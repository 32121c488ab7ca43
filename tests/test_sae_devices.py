"""Device choice (sae/devices.py): auto/cpu/cuda/cuda:N, the errors without CUDA, batches moved by DeviceStream.

This machine has no GPU: what runs on CUDA is not exercised here; these tests pin the choice, the errors and
that the CPU path is unchanged."""

from itertools import islice

import pytest
import torch

import sae
from sae.config import TrainConfig
from sae.devices import resolve_device, to_device
from sae.errors import SAEConfigError
from sae.training.streams import DeviceStream, TensorStream

FAST = {"norm_estimation_batches": 2, "geometric_median_rows": 256, "progress": False}


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("count", "spec", "expected"),
    [(0, "auto", "cpu"), (2, "auto", "cuda"), (0, "cpu", "cpu"), (2, "cuda", "cuda"), (2, "cuda:1", "cuda:1"),
     (2, None, "cuda")],
)
def test_the_device_names_resolve(monkeypatch, count, spec, expected):
    fake_cuda(monkeypatch, count)
    assert resolve_device(spec) == torch.device(expected)


@pytest.mark.parametrize(
    ("count", "spec", "message"),
    [
        (0, "cuda", "device 'cuda': torch sees no CUDA GPU here (torch.cuda.is_available() is False); use device cpu "
                    "or auto."),
        (2, "cuda:2", "device 'cuda:2': this machine has 2 CUDA GPU(s) (cuda:0..cuda:1)."),
        (2, "gpu", "device must be auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N, got 'gpu'."),
        (2, "cuda:x", "got 'cuda:x'"),
    ],
)
def test_bad_or_missing_devices_are_one_clear_error(monkeypatch, count, spec, message):
    fake_cuda(monkeypatch, count)
    with pytest.raises(SAEConfigError) as info:
        resolve_device(spec)
    assert message in str(info.value)


def test_a_bad_device_is_refused_before_any_data_is_read():
    with pytest.raises(SAEConfigError, match="device must be auto"):
        TrainConfig(device="tpu")
    with pytest.raises(SAEConfigError, match="device must be auto"):
        sae.train(torch.randn(512, 8), arch="topk", n_features=16, k=2, batch_size=128, device="tpu", **FAST)


def test_training_on_the_cpu_device_is_the_default_run_exactly(monkeypatch):
    fake_cuda(monkeypatch, 0)  # auto is the CPU here
    acts = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    runs = [sae.train(acts, arch="mutual_choice", n_features=16, k=2, batch_size=256, seed=1, **FAST, **extra)
            for extra in ({}, {"device": "cpu"})]
    for name, tensor in runs[0].state_dict().items():
        assert torch.equal(tensor, runs[1].state_dict()[name]), name
    assert runs[1].W_enc.device.type == "cpu"
    assert runs[1].training_info["train_config"]["device"] == "cpu"


def test_device_stream_moves_every_batch_and_keeps_the_stream_shape():
    x, g = torch.randn(64, 4), torch.randn(64, 4)
    inner = TensorStream(x, g, 16, shuffle=False, seed=0)
    moved = DeviceStream(inner, torch.device("meta"))
    assert (moved.d_in, moved.has_grads, moved.tokens_per_pass, moved.reiterable) == (4, True, 64, True)
    batches = list(islice(moved.batches(1), 3))  # a stream runs pass after pass: take three batches
    assert len(batches) == 3 and all(a.device.type == "meta" and b.device.type == "meta" for a, b in batches)
    assert [a.shape for a, _ in moved.peek(2)] == [torch.Size([16, 4])] * 2


def test_to_device_leaves_a_tensor_already_there_and_none_alone():
    t = torch.ones(3)
    assert to_device(t, torch.device("cpu")) is t and to_device(None, torch.device("cpu")) is None
    assert to_device(t, torch.device("meta")).device.type == "meta"


def test_load_puts_an_sae_on_the_device_asked_for(tmp_path, monkeypatch):
    model = sae.train(torch.randn(1024, 8), arch="topk", n_features=16, k=2, batch_size=256, **FAST)
    folder = model.save(tmp_path / "topk")
    loaded = sae.load(folder, device="cpu")
    assert loaded.W_enc.device.type == "cpu" and torch.equal(loaded.W_enc, model.W_enc)
    fake_cuda(monkeypatch, 0)
    with pytest.raises(SAEConfigError, match="torch sees no CUDA GPU here"):
        sae.load(folder, device="cuda")
