"""Mixed precision (TrainConfig.autocast): bf16/fp16 GEMMs under torch.autocast, fp32 weights, Adam state and loss.

This machine has no GPU: the bf16/fp16 runs here are CPU autocast (slower than fp32 on this CPU, hence not the
default); the CUDA capability check is exercised with a faked torch.cuda.
"""

import contextlib

import pytest
import torch

import sae
from experiments.cli.root import main
from sae.config import TrainConfig
from sae.devices import autocast_dtype
from sae.errors import SAEConfigError, SAETrainingError
from sae.registry import TRAINABLE, get_architecture
from sae.synthetic import planted_dictionary_data

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, K, BATCH, STEPS = 32, 64, 4, 512, 150
HELD_OUT = 4096


@pytest.fixture(scope="module")
def planted():
    return planted_dictionary_data(32768 + HELD_OUT, D, F, K, zipf_exponent=0.5, seed=0).acts


def train(acts, arch="topk", **options):
    grads = torch.randn(acts.shape, generator=torch.Generator().manual_seed(1))
    return sae.build_trainer(
        acts, grads=grads if get_architecture(arch).needs_grads else None, arch=arch, n_features=F, k=K,
        batch_size=BATCH, total_tokens=BATCH * STEPS, lr=3e-2, progress=False, **options,
    )


def held_out_fvu(model, x):
    with torch.no_grad():
        return float((x - model(x)).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())


@pytest.mark.parametrize(
    ("arch", "mode", "sparse"),
    [(arch, "bf16", True) for arch in TRAINABLE] + [("topk", "bf16", False), ("topk", "fp16", True)],
)
def test_an_autocast_run_keeps_fp32_state_and_trains_as_well_as_fp32(planted, arch, mode, sparse):
    """150 steps on the planted dictionary: held-out FVU 0.11-0.16 in fp32 (by arch), and bf16/fp16 runs within
    0.005 of it (measured, every arch); 0.02 leaves room for other seeds without admitting a run that did not
    learn (an untrained SAE's FVU is ~1)."""
    train_acts, held = planted[:-HELD_OUT], planted[-HELD_OUT:]
    reference = train(train_acts, arch, sparse_kernels=sparse).run()
    trainer = train(train_acts, arch, sparse_kernels=sparse, autocast=mode)
    model = trainer.run()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    moments = [v for state in trainer.optimizer.state.values() for v in state.values()]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in moments)
    loss = model.training_info["last_metrics"]["loss"]
    assert loss is not None and 0 < loss < 1
    assert held_out_fvu(model, held) == pytest.approx(held_out_fvu(reference, held), abs=0.02)
    assert not torch.equal(model.W_enc, reference.W_enc)  # autocast did change the arithmetic
    assert model.training_info["train_config"]["autocast"] == mode


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_on_sparse_kernels_the_gemm_is_low_precision_and_every_tensor_saved_for_backward_is_fp32(planted, mode):
    """Why fp16 needs no loss scaling on sparse kernels: the GEMM runs without autograd and the values gathered
    from it are fp32, so no gradient is ever fp16. The dense reference saves low-precision GEMM inputs (its
    backward runs in them), which is why autocast fp16 refuses sparse_kernels=False."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    x = planted[:BATCH]

    def saved_dtypes(trainer):
        trainer.initialize()
        saved = set()

        def pack(t):
            saved.add(t.dtype)
            return t

        x_n, _, _ = trainer.sae.normalize(x)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rec, aux, _, _ = trainer.losses(x_n, None)
        assert rec.dtype == aux.dtype == torch.float32  # the NMSE terms are fp32
        return {d for d in saved if d.is_floating_point}

    sparse = train(planted, autocast=mode)
    assert saved_dtypes(sparse) == {torch.float32}
    with sparse.autocast():
        assert sparse.sae.encode_train_sparse(sparse.sae.normalize(x)[0]).pre_acts.dtype == dtype
    dense = train(planted, autocast="bf16", sparse_kernels=False)
    assert torch.bfloat16 in saved_dtypes(dense)


def test_an_fp16_overflow_stops_the_run_naming_the_step_and_bf16_trains_on_the_same_data():
    """Unnormalised activations of scale 3e4: pre-activations pass fp16's 65504, so the first step's loss is NaN;
    bf16 has fp32's range and trains (loss 0.63 here, as fp32)."""
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) * 3e4
    options = dict(arch="topk", n_features=32, k=2, batch_size=128, normalization="none", encoder_init_scale=False,
                   progress=False)
    with pytest.raises(SAETrainingError, match=r"the loss became nan at step 0 .* Under autocast fp16, "
                                               r"pre-activations beyond fp16's range \(65504\) become inf: try bf16"):
        sae.train(x, autocast="fp16", **options)
    assert sae.train(x, autocast="bf16", **options).training_info["last_metrics"]["loss"] < 1


def test_unknown_autocast_values_are_refused_with_the_allowed_ones():
    message = "unknown autocast 'fp8'; allowed: none, bf16, fp16."
    with pytest.raises(SAEConfigError, match=message):
        TrainConfig(autocast="fp8")
    with pytest.raises(SAEConfigError, match=message):
        sae.train(torch.randn(512, 8), arch="topk", n_features=16, k=2, batch_size=128, autocast="fp8", progress=False)
    with pytest.raises(SAEConfigError, match=message):
        autocast_dtype("fp8", torch.device("cpu"))


def test_fp16_on_the_dense_reference_path_is_refused_with_the_reason():
    with pytest.raises(SAEConfigError, match=r"autocast fp16 needs sparse_kernels=True: .* underflow without loss "
                                             r"scaling .*; with sparse_kernels=False use autocast bf16 or none\."):
        TrainConfig(autocast="fp16", sparse_kernels=False)
    TrainConfig(autocast="bf16", sparse_kernels=False)  # bf16 has fp32's exponent range: no underflow


def fake_gpu(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


def test_bf16_on_a_gpu_without_native_bf16_is_one_error_naming_the_device_and_what_it_allows(monkeypatch):
    fake_gpu(monkeypatch, bf16=False)
    message = (
        "autocast bf16: device cuda:0 (Tesla V100-SXM2-16GB) has no native bfloat16 "
        "(torch.cuda.is_bf16_supported(including_emulation=False) is False there; bf16 needs compute capability "
        "8.0 or newer); allowed on it: none, fp16."
    )
    with pytest.raises(SAEConfigError) as info:
        autocast_dtype("bf16", torch.device("cuda:0"))
    assert str(info.value) == message
    # Through sae.train it is refused before the SAE moves to the (fake) GPU or any data is read.
    with pytest.raises(SAEConfigError, match="has no native bfloat16"):
        sae.train(torch.randn(512, 8), arch="topk", n_features=16, k=2, batch_size=128, device="cuda",
                  autocast="bf16", progress=False)
    assert autocast_dtype("fp16", torch.device("cuda:0")) == torch.float16
    assert autocast_dtype("none", torch.device("cuda:0")) is None


def test_bf16_is_allowed_where_torch_says_the_gpu_has_it_and_on_every_cpu(monkeypatch):
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    fake_gpu(monkeypatch, bf16=True)
    assert autocast_dtype("bf16", torch.device("cuda:0")) == torch.bfloat16


def test_a_checkpoint_resumes_under_another_autocast_as_under_another_device(tmp_path, planted):
    """autocast is run_only, as device is: it changes how this process computes, not the saved SAE's layout."""
    options = dict(checkpoint_dir=str(tmp_path), checkpoint_every=50, log_every=50)

    class Stop(Exception):
        pass

    def stop(step, metrics):
        if step == 100:
            raise Stop

    with pytest.raises(Stop):
        train(planted, log_fn=stop, **options).run()
    logged = []
    resumed = train(planted, autocast="bf16", log_fn=lambda step, metrics: logged.append(step), **options)
    resumed.run()
    assert logged == [100, 150]  # it went on from the step-50 checkpoint (the log at 100 came before its save)
    assert resumed.sae.training_info["train_config"]["autocast"] == "bf16"


def test_train_help_says_which_autocast_is_the_default_where_and_why(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--autocast AUTOCAST" in out
    assert "none is the default on every device: on CPU bf16 measured ~4x slower than fp32; on CUDA it is opt-in" in out
