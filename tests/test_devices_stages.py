"""`--device` for the stages around training (issue 11): the cache, the evaluation, the analysis and the
interventions. The device-generic tests run on every device torch sees (CUDA where there is one) and compare with the
CPU; the bad-input ones need no GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activations import CacheConfig, CacheError, build_cache, load_cache
from experiments.analysis.pipeline import analyze
from experiments.analysis.store import AnalysisStore
from experiments.cli import main
from experiments.evaluation import evaluate_sae
from experiments.training import RunConfig, train_run

CONTEXT = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")


@pytest.fixture(autouse=True)
def _isolated(isolated_cache_root, datasets_tmp_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def cache_cfg(folder, tiny_hf_folder, corpus_txt, device: str, **extra) -> CacheConfig:
    return CacheConfig(model=str(tiny_hf_folder), hooks=["blocks.1.hook_resid_post"], corpus=str(corpus_txt),
                       tokens=16 * CONTEXT, context=CONTEXT, batch_size=4, out=str(folder), device=device, **extra)


@pytest.mark.parametrize("device", DEVICES)
def test_a_cache_built_on_each_device_matches_the_cpu_one(tiny_hf_folder, corpus_txt, tmp_path, device):
    build_cache(cache_cfg(tmp_path / "cpu", tiny_hf_folder, corpus_txt, "cpu", with_grads=True), progress=False)
    build_cache(cache_cfg(tmp_path / device, tiny_hf_folder, corpus_txt, device, with_grads=True), progress=False)
    ours, ref = load_cache(tmp_path / device), load_cache(tmp_path / "cpu")
    assert "device" not in ours.manifest  # not part of the identity: a resume may run elsewhere
    for kind in ("acts", "grads"):
        a = np.asarray(ours.rows(0, ours.n_tokens, kind=kind))
        b = np.asarray(ref.rows(0, ref.n_tokens, kind=kind))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def cache_and_sae(tmp_path, tiny_hf_folder, corpus_txt) -> None:
    """A CPU cache in tmp_path/c and a small TopK SAE trained on it in tmp_path/run."""
    build_cache(cache_cfg(tmp_path / "c", tiny_hf_folder, corpus_txt, "cpu"), progress=False)
    train_run(RunConfig(activations=str(tmp_path / "c"), out=str(tmp_path / "run"), n_features=64, k=4,
                        total_tokens=512, batch_size=128, progress=False, wandb=False,
                        options={"norm_estimation_batches": 2, "geometric_median_rows": 256}))


@pytest.mark.parametrize("device", DEVICES)
def test_eval_on_each_device_matches_the_cpu(tiny_hf_folder, corpus_txt, tmp_path, device):
    cache_and_sae(tmp_path, tiny_hf_folder, corpus_txt)
    args = dict(sae_dir=str(tmp_path / "run"), activations_dir=str(tmp_path / "c"), model_name=str(tiny_hf_folder),
                tokens=4 * CONTEXT)
    here, ref = evaluate_sae(**args, device=device), evaluate_sae(**args, device="cpu")
    for key in ("fvu", "l0", "ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "kl_div"):
        assert here[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("device", DEVICES)
def test_analyze_on_each_device_stores_what_the_cpu_stores(tiny_hf_folder, corpus_txt, tmp_path, device):
    cache_and_sae(tmp_path, tiny_hf_folder, corpus_txt)
    for where in ("cpu", device):
        analyze(tmp_path / "run", tmp_path / "c", model=None, out=tmp_path / where, name="s", top_n=3, window=2,
                progress=False, device=where)
    ours, ref = AnalysisStore(tmp_path / device), AnalysisStore(tmp_path / "cpu")
    np.testing.assert_allclose(ours.densities("s"), ref.densities("s"), atol=1e-6)
    for f in (0, 5, 17):
        assert ours.feature("s", f)["max_act"] == pytest.approx(ref.feature("s", f)["max_act"], rel=1e-4, abs=1e-6)


@NO_CUDA
@pytest.mark.parametrize("command", ["cache", "eval", "analyze", "steer", "unlearn", "ioi", "calibrate", "sweep",
                                     "demo", "dashboard"])
def test_cuda_without_a_gpu_is_one_line_exit_2_before_any_work(tiny_hf_folder, tmp_path, capsys, command):
    none = str(tmp_path / "none")  # nothing is there: the device is refused before anything is read
    argv = {"cache": ["cache", "--model", str(tiny_hf_folder), "--out", str(tmp_path / "c")],
            "eval": ["eval", "--sae", none, "--activations", none],
            "analyze": ["analyze", "--sae", none, "--activations", none, "--out", str(tmp_path / "c")],
            "steer": ["steer", "--sae", none, "--features", "0", "--coefficients", "1"],
            "unlearn": ["unlearn", "--sae", none, "--concept", "the fox"],
            "ioi": ["ioi", "--sae", none],
            "calibrate": ["calibrate", "--sae", none, "--activations", none],
            "sweep": ["sweep", "experiments/sweeps/arch_compare.yaml", "--no-wandb", "--out", str(tmp_path / "c")],
            "demo": ["demo", "--out", str(tmp_path / "c")],
            "dashboard": ["dashboard", "--store", none]}[command]
    code = main([*argv, "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "device 'cuda': torch sees no CUDA GPU here" in err and "use device cpu or auto" in err
    assert not (tmp_path / "c").exists()


def test_a_malformed_device_is_refused_naming_the_allowed_forms(tiny_hf_folder, tmp_path):
    with pytest.raises(CacheError, match=r"--device: device must be auto \(CUDA when torch sees a GPU, else CPU\), "
                                         r"cpu, cuda or cuda:N, got 'gpu'"):
        build_cache(CacheConfig(model=str(tiny_hf_folder), out=str(tmp_path / "c"), device="gpu"), progress=False)
    assert not (tmp_path / "c").exists()


def test_a_bfloat16_model_forward_is_recorded_and_close_to_float32(tiny_hf_folder, corpus_txt, tmp_path):
    build_cache(cache_cfg(tmp_path / "fp32", tiny_hf_folder, corpus_txt, "cpu"), progress=False)
    build_cache(cache_cfg(tmp_path / "bf16", tiny_hf_folder, corpus_txt, "cpu", model_dtype="bfloat16"),
                progress=False)
    ours, ref = load_cache(tmp_path / "bf16"), load_cache(tmp_path / "fp32")
    assert ours.manifest["model_dtype"] == "bfloat16" and ref.manifest["model_dtype"] == "float32"
    a, b = (torch.as_tensor(np.asarray(c.rows(0, c.n_tokens))) for c in (ours, ref))
    relative = (a - b).norm(dim=1) / b.norm(dim=1)
    assert 0 < float(relative.max()) < 0.1  # bf16 keeps ~3 significant digits, compounded over two blocks
    with pytest.raises(CacheError, match="model_dtype: cache has 'bfloat16', asked 'float32'"):
        build_cache(cache_cfg(tmp_path / "bf16", tiny_hf_folder, corpus_txt, "cpu"), progress=False)
    with pytest.raises(CacheError, match="unknown --model-dtype 'int8'; allowed: float32, float16, bfloat16"):
        build_cache(cache_cfg(tmp_path / "x", tiny_hf_folder, corpus_txt, "cpu", model_dtype="int8"), progress=False)


@NO_CUDA
def test_auto_on_a_machine_without_cuda_says_so_in_one_line(tiny_hf_folder, corpus_txt, tmp_path, capsys):
    args = ["cache", "--model", str(tiny_hf_folder), "--hooks", "blocks.1.hook_resid_post", "--corpus",
            str(corpus_txt), "--tokens", "32", "--context", "16"]
    code = main([*args, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 0 and err.endswith("saewb cache: ran on the CPU (--device auto: torch sees no CUDA GPU)\n")
    code = main([*args, "--out", str(tmp_path / "d"), "--device", "cpu"])
    assert code == 0 and "no CUDA GPU" not in capsys.readouterr().err
    code = main([*args, "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 0 and capsys.readouterr().err == ""  # --quiet keeps stderr empty


@pytest.mark.parametrize("device", DEVICES)
def test_steer_and_unlearn_on_each_device_score_what_the_cpu_scores(tiny_hf_folder, corpus_txt, tmp_path, capsys,
                                                                    device):
    cache_and_sae(tmp_path, tiny_hf_folder, corpus_txt)
    common = ["--sae", str(tmp_path / "run"), "--contexts", "2", "--context-length", "16", "--corpus",
              str(corpus_txt), "--json"]
    commands = {"steer": ["steer", *common, "--features", "0,3", "--coefficients", "0,4", "--new-tokens", "3"],
                "unlearn": ["unlearn", *common, "--concept", "the quick brown fox", "--sizes", "0,2",
                            "--generation-tokens", "3"]}
    for name, argv in commands.items():
        results = {}
        for where in ("cpu", device):
            assert main([*argv, "--device", where]) == 0
            results[where] = json.loads(capsys.readouterr().out)
        ours, ref = results[device], results["cpu"]
        points = zip(ours["sweep"], ref["sweep"], strict=True) if name == "steer" else zip(ours, ref, strict=True)
        for a, b in points:
            for key in ("kl", "delta_ce", "effect" if name == "steer" else "forgetting"):
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (name, key)
            assert a.get("text") == b.get("text") and a.get("features") == b.get("features")
        if name == "steer":
            assert ours["sweep"][0]["kl"] == 0.0  # coefficient 0 costs nothing on any device
