"""Training runs, `saewb train` / `saewb eval`, the comparison report and CE/KL with the model in the loop."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sae as sae_lib
from activations import CacheConfig, build_cache, load_cache, load_model
from activations.hooks import resolve_hooks
from experiments import evaluation
from experiments.cli import main
from experiments.cli.demo import serve_dashboard
from experiments.compare import main as compare_main
from experiments.comparison import runs as compare_runs
from experiments.comparison.plan import plan_runs
from experiments.comparison.report import aggregate, claims_table, markdown_table, summary_tables, verdict, write_report
from experiments.demo import DemoConfig
from experiments.evaluation import (
    ce_and_kl,
    clean_reference,
    in_the_loop_reports,
    model_in_the_loop,
    restart_layer,
    sae_in_the_loop,
    saes_in_the_loop,
)
from experiments.training import RunConfig, load_run_config, run_config_from_dict, train_run

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 32
FAST = {"norm_estimation_batches": 2, "geometric_median_rows": 256}


@pytest.fixture(autouse=True)
def _isolated(isolated_cache_root, datasets_tmp_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def hf_model(tiny_hf_folder):
    return load_model(str(tiny_hf_folder))


@pytest.fixture(scope="module")
def caches(tmp_path_factory, hf_model, tiny_hf_folder, corpus_txt):
    """A training cache (two hooks, with gradients) and a held-out cache that continues it."""
    root = tmp_path_factory.mktemp("caches")
    common = dict(model=str(tiny_hf_folder), corpus=str(corpus_txt), context=CONTEXT, batch_size=8)
    train = build_cache(
        CacheConfig(
            hooks=[HOOK, "blocks.1.mlp.hook_post"],
            out=str(root / "train"),
            tokens=64 * CONTEXT,
            with_grads=True,
            **common,
        ),
        model=hf_model,
        progress=False,
    )
    build_cache(
        CacheConfig(
            hooks=[HOOK], out=str(root / "eval"), tokens=16 * CONTEXT, skip_contexts=train["n_contexts"], **common
        ),
        model=hf_model,
        progress=False,
    )
    return root / "train", root / "eval"


def run_cfg(caches, tmp_path, **overrides) -> RunConfig:
    train, held_out = caches
    values = dict(
        activations=str(train),
        eval_activations=str(held_out),
        out=str(tmp_path / "run"),
        arch="topk",
        n_features=64,
        k=4,
        batch_size=256,
        seed=0,
        wandb=False,
        progress=False,
        options=dict(FAST),
    )
    values.update(overrides)
    return RunConfig(**values)


def test_held_out_cache_continues_the_training_stream(caches, hf_model, tiny_hf_folder, corpus_txt):
    train, held_out = load_cache(caches[0]), load_cache(caches[1])
    both = CacheConfig(
        model=str(tiny_hf_folder), hooks=[HOOK], corpus=str(corpus_txt), context=CONTEXT, tokens=80 * CONTEXT
    )
    from activations.cache import make_tokens

    stream = make_tokens(both, hf_model.tokenizer, int(hf_model.tokenizer.bos_token_id), 80)
    np.testing.assert_array_equal(np.asarray(train.tokens), stream[:64])
    np.testing.assert_array_equal(np.asarray(held_out.tokens), stream[64:])


def test_train_run_writes_a_loadable_run_folder(caches, tmp_path):
    cfg = run_cfg(caches, tmp_path, total_tokens=256 * 6, options={**FAST, "log_every": 2})
    model, metrics = train_run(cfg)
    out = tmp_path / "run"
    assert {"cfg.json", "sae_weights.safetensors", "run_config.json", "train_log.jsonl", "eval.json"} <= {
        p.name for p in out.iterdir()
    }
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2, 4, 6]
    assert all(row["l0"] == 4.0 for row in log)  # TopK: exactly k per token
    saved = json.loads((out / "eval.json").read_text())
    assert saved["in_sample"] is False and saved["eval_rows"] == load_cache(caches[1]).n_tokens
    assert saved["l0"] == pytest.approx(4.0)
    assert metrics["train_tokens"] == 256 * 6
    x = load_cache(caches[1]).rows(0, 50)
    assert torch.equal(sae_lib.load(out).encode(x), model.encode(x))


def test_train_on_the_second_hook_of_a_cache(caches, tmp_path):
    model, _ = train_run(
        run_cfg(caches, tmp_path, hook="blocks.1.mlp.hook_post", eval_activations=None, total_tokens=512)
    )
    assert model.cfg.d_in == 64  # d_mlp, not d_model
    assert model.metadata["hook_name"] == "blocks.1.mlp.hook_post"


def test_unknown_hook_and_options_are_refused(caches, tmp_path):
    with pytest.raises(sae_lib.SAEConfigError, match=r"hook 'blocks.9.hook_resid_post' is not in .*it holds"):
        train_run(run_cfg(caches, tmp_path, hook="blocks.9.hook_resid_post"))
    with pytest.raises(sae_lib.SAEConfigError, match=r"unknown option\(s\) \['fc_capacty'\]; allowed: \["):
        run_cfg(caches, tmp_path, options={"fc_capacty": "zipf"})
    with pytest.raises(sae_lib.SAEConfigError, match=r"options \['k'\] are set by their own fields"):
        run_cfg(caches, tmp_path, options={"k": 3})
    with pytest.raises(sae_lib.SAEConfigError, match="give --out"):
        run_cfg(caches, tmp_path, out="")


def test_yaml_config_top_level_sae_options(tmp_path):
    path = tmp_path / "fc.yaml"
    path.write_text("activations: a\nout: b\narch: feature_choice\nn_features: 128\nk: 8\nfc_capacity: zipf\n")
    cfg = load_run_config(path, out="elsewhere")
    assert (cfg.arch, cfg.n_features, cfg.k, cfg.out) == ("feature_choice", 128, 8, "elsewhere")
    assert cfg.options == {"fc_capacity": "zipf"}
    assert run_config_from_dict({"activations": "a", "out": "b", "options": {"aux_loss": "aux_zipf"}}).options == {
        "aux_loss": "aux_zipf"
    }
    with pytest.raises(sae_lib.SAEConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(sae_lib.SAEConfigError, match="must hold a mapping"):
        load_run_config(tmp_path / "list.yaml")


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted(Path("experiments/configs").glob("*.yaml"))
    assert [p.stem for p in configs] == ["feature_choice", "gradient_topk", "mutual_choice", "topk"]
    for path in configs:
        cfg = load_run_config(path)
        assert cfg.arch == path.stem and cfg.n_features == 4608 and cfg.k == 32


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_saewb_train_and_eval_json(caches, tmp_path, capsys, tiny_hf_folder):
    train, held_out = caches
    code, out, err = cli(
        capsys,
        "train",
        "--activations",
        train,
        "--arch",
        "mutual_choice",
        "--n-features",
        64,
        "--k",
        4,
        "--batch-size",
        256,
        "--total-tokens",
        2048,
        "--out",
        tmp_path / "mc",
        "--no-wandb",
        "--no-progress",
        "--norm-estimation-batches",
        2,
    )
    assert code == 0, err
    headline = json.loads(out.strip().splitlines()[-1])
    assert headline["train_tokens"] == 2048
    saved = json.loads((tmp_path / "mc" / "run_config.json").read_text())
    assert saved["options"] == {"norm_estimation_batches": 2}
    code, out, err = cli(
        capsys,
        "eval",
        "--sae",
        tmp_path / "mc",
        "--activations",
        held_out,
        "--json",
        "--model",
        tiny_hf_folder,
        "--tokens",
        128,
    )
    assert code == 0, err
    result = json.loads(out)
    required = {
        "l0",
        "fvu",
        "explained_variance",
        "dead_fraction",
        "dense_fraction",
        "ce_loss_clean",
        "ce_loss_sae",
        "ce_loss_zero",
        "ce_loss_recovered",
        "kl_div",
    }
    assert required <= set(result)
    assert result["explained_variance"] == pytest.approx(1 - result["fvu"])
    assert result["ce_loss_recovered"] == pytest.approx(
        (result["ce_loss_zero"] - result["ce_loss_sae"]) / (result["ce_loss_zero"] - result["ce_loss_clean"])
    )
    assert result["kl_div"] >= 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "relu"], "unknown arch 'relu'"),
        (["--k", "64"], "k=64 must be smaller than n_features=64"),
        (["--n-features", "0"], "n_features must be a positive integer"),
        (["--arch", "feature_choice", "--batch-size", "8"], "batch size"),
        (["--arch", "gradient_topk", "--activations", "EVAL"], "--with-grads"),
    ],
)
def test_saewb_train_bad_input_is_one_line(caches, tmp_path, capsys, args, message):
    train, held_out = caches
    argv = [
        "train",
        "--activations",
        train,
        "--n-features",
        64,
        "--k",
        4,
        "--batch-size",
        256,
        "--total-tokens",
        512,
        "--out",
        tmp_path / "bad",
        "--no-wandb",
        "--no-progress",
    ]
    argv += [str(held_out) if a == "EVAL" else a for a in args]
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("saewb train: error: "), err
    assert message in err


def test_saewb_eval_refuses_a_width_mismatch(caches, tmp_path, capsys):
    train_run(run_cfg(caches, tmp_path, total_tokens=512))
    code, _, err = cli(
        capsys, "eval", "--sae", tmp_path / "run", "--activations", caches[0], "--hook", "blocks.1.mlp.hook_post"
    )
    assert code == 2
    assert "the SAE has d_in=32 but" in err and "has width 64 at blocks.1.mlp.hook_post" in err


def test_ce_recovered_is_one_for_identity_and_zero_for_zero(hf_model, caches):
    """docs/ALGORITHMS.md §11: CE recovered = 1 for an identity 'SAE' and 0 for a zero output, with the real splice."""
    spec = resolve_hooks(hf_model, [HOOK])[0]
    tokens = np.asarray(load_cache(caches[1]).tokens[:4])
    bos = int(hf_model.tokenizer.bos_token_id)
    identity = model_in_the_loop(hf_model, spec, lambda x: x, tokens, bos)
    assert identity["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert identity["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert identity["ce_loss_sae"] == pytest.approx(identity["ce_loss_clean"], abs=1e-6)
    zero = model_in_the_loop(hf_model, spec, torch.zeros_like, tokens, bos)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_loss_zero"] != pytest.approx(zero["ce_loss_clean"])


def test_comparison_plan_and_table(tmp_path):
    base = RunConfig(activations="c", out=str(tmp_path), n_features=64, k=4)
    labels = [(label, cfg.arch, cfg.activations) for label, cfg in plan_runs(base, "g")]
    assert labels == [
        ("topk", "topk", "c"),
        ("mutual_choice", "mutual_choice", "c"),
        ("feature_choice", "feature_choice", "c"),
        ("feature_choice+zipf", "feature_choice", "c"),
        ("mutual_choice+aux_zipf", "mutual_choice", "c"),
        ("mutual_choice+per_token_standardize", "mutual_choice", "c"),
        ("gradient_topk", "gradient_topk", "g"),
        ("topk@grads-cache", "topk", "g"),
    ]
    table = markdown_table(
        [{"run": "topk", "data": "cache", "l0": 32.0, "fvu": 0.12345, "dead_frac": 0.5, "train_tokens_per_s": 12345.6}]
    )
    lines = table.splitlines()
    assert lines[0].startswith("| run | data | L0 |") and lines[1].startswith("|---|")
    assert lines[2] == "| topk | cache | 32.0 | – | 0.1235 | – | 0.500 | – | – | – | – | – | – | – | 12,346 |"
    assert plan_runs(base, None)[4][1].options == {"aux_loss": "aux_zipf"}
    assert plan_runs(base, None)[3][1].options == {"fc_capacity": "zipf"}


def test_comparison_grid_over_seeds_and_k_pairs_each_run_with_its_topk(tmp_path):
    base = RunConfig(activations="c", out=str(tmp_path), n_features=64, k=4, eval_activations="e")
    runs = plan_runs(base, "g", "eg", seeds=[0, 1, 2], ks=[4, 8], labels=["topk", "mutual_choice", "gradient_topk",
                                                                          "topk@grads-cache"])
    assert len(runs) == 2 * 3 * 4
    gsae = [cfg for label, cfg in runs if label == "gradient_topk"]
    assert {(c.k, c.seed) for c in gsae} == {(k, s) for k in (4, 8) for s in (0, 1, 2)}
    assert all(c.activations == "g" and c.eval_activations == "eg" for c in gsae)
    assert runs[0][1].out == str(tmp_path / "k4-s0" / "topk")
    with pytest.raises(sae_lib.SAEConfigError, match="unknown comparison run.*allowed: topk, mutual_choice"):
        plan_runs(base, None, labels=["topk", "nope"])
    fvu = {("topk", 0): 0.30, ("topk", 1): 0.32, ("topk", 2): 0.31,
           ("mutual_choice", 0): 0.28, ("mutual_choice", 1): 0.31, ("mutual_choice", 2): 0.29}
    rows = [{"run": r, "label": r, "k": 4, "seed": s, "fvu": v} for (r, s), v in fvu.items()]
    summary = {s["run"]: s for s in aggregate(rows)}
    diffs = np.array([-0.02, -0.01, -0.02])  # MC - TopK, paired by seed
    half = 4.303 * diffs.std(ddof=1) / np.sqrt(3)  # Student t, 2 degrees of freedom
    assert summary["mutual_choice"]["fvu_vs_topk"] == pytest.approx((diffs.mean(), half), rel=1e-9)
    assert summary["topk"]["fvu"] == pytest.approx((0.31, 4.303 * 0.01 / np.sqrt(3)), rel=1e-9)
    assert summary["topk"]["references"] == [] and "fvu_vs_topk" not in summary["topk"]
    table = summary_tables(list(summary.values()))
    assert "| mutual_choice | 4 | topk | – | – | – | -0.0167 ± 0.0143 |" in table
    # a variant is also paired with the run it changes one thing of
    rows += [{"run": "mutual_choice+aux_zipf", "label": "mutual_choice+aux_zipf", "k": 4, "seed": s, "fvu": v + 0.01}
             for (r, s), v in fvu.items() if r == "mutual_choice"]
    zipf = {s["run"]: s for s in aggregate(rows)}["mutual_choice+aux_zipf"]
    assert zipf["references"] == ["topk", "mutual_choice"]
    assert zipf["fvu_vs_mutual_choice"] == pytest.approx((0.01, 0.0), abs=1e-12)


def test_write_report_files(tmp_path):
    rows = [
        {
            "run": "topk",
            "data": "cache",
            "l0": 4.0,
            "fvu": 0.5,
            "dead_frac": 0.0,
            "l0_histogram": torch.tensor([0, 3, 5]),
            "ce_loss_recovered": 0.9,
        }
    ]
    table = write_report(rows, tmp_path)
    assert json.loads((tmp_path / "comparison.json").read_text())[0]["l0_histogram"] == [0, 3, 5]
    assert (tmp_path / "comparison.md").read_text() == table
    html = (tmp_path / "comparison.html").read_text()
    assert "L0 vs CE loss recovered" in html and "per-token L0 histogram" in html


def test_synthetic_recovery_measures():
    from experiments.synthetic_benchmark import recovery

    atoms = torch.nn.functional.normalize(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    freqs = torch.linspace(0.01, 0.5, 12)
    perfect = recovery(atoms[torch.randperm(12)] * 3.0, atoms, freqs)  # row order and scale do not matter
    assert perfect == pytest.approx({"mean_max_cosine": 1.0, "recovered_0.9": 1.0, "rare_recovered_0.9": 1.0})
    half = recovery(torch.cat([atoms[6:], -atoms[6:]]), atoms, freqs)  # only the 6 most frequent atoms learned
    assert half["recovered_0.9"] == pytest.approx(0.5)
    assert half["rare_recovered_0.9"] == pytest.approx(0.0)


@pytest.mark.parametrize(("env", "flag"), [({"CI": "true"}, True), ({"SAEWB_NO_DASHBOARD": "1"}, True), ({}, False)])
def test_demo_never_blocks_on_the_dashboard_in_scripted_runs(monkeypatch, tmp_path, env, flag):
    for key in ("CI", "SAEWB_NO_DASHBOARD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    said = []
    serve_dashboard(DemoConfig(dashboard=flag, port=8599), tmp_path / "store", said.append)
    assert calls == []
    assert said == [f"done. Browse the features with: saewb dashboard --store {tmp_path / 'store'} --port 8599"]


def test_demo_serves_the_dashboard_when_interactive(monkeypatch, tmp_path):
    for key in ("CI", "SAEWB_NO_DASHBOARD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **k: calls.append(cmd) or 0)
    serve_dashboard(DemoConfig(port=8599, device="cpu"), tmp_path / "store", lambda msg: None)
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[cmd.index("--server.port") + 1] == "8599"
    assert cmd[-4:] == ["--store", str(tmp_path / "store"), "--device", "cpu"]  # the demo's device, for the pages


def test_g_sae_is_scored_with_its_gradient_rule_and_as_plain_topk(caches, tmp_path):
    """Bug fixed: evaluation encoded a g-SAE without gradients, so its numbers were plain TopK's on a
    dictionary trained with gradient-chosen supports. With gradients in the eval cache both rules are
    reported and named; without them the report says it fell back to plain TopK."""
    train, held_out = caches
    model, metrics = train_run(run_cfg(caches, tmp_path, arch="gradient_topk", eval_activations=str(train),
                                       total_tokens=1024))
    cache = load_cache(train)
    n = metrics["eval_rows"]
    x, g = cache.rows(0, n, hook=HOOK), cache.rows(0, n, hook=HOOK, kind="grads")
    assert metrics["selection_rule"] == "gradient selection"
    assert metrics["fvu"] == pytest.approx(sae_lib.evaluate(model, [(x, g)])["fvu"], rel=1e-9)
    plain = metrics["plain_topk"]
    assert plain["selection_rule"] == "plain TopK at inference"
    assert plain["fvu"] == pytest.approx(sae_lib.evaluate(model, x)["fvu"], rel=1e-9)
    assert plain["fvu"] != pytest.approx(metrics["fvu"], rel=1e-6)  # the rule matters for this dictionary
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["selection_rule"] == "gradient selection" and saved["plain_topk"]["fvu"] == plain["fvu"]

    _, no_grads = train_run(run_cfg(caches, tmp_path / "b", arch="gradient_topk", total_tokens=1024))
    assert no_grads["selection_rule"] == "plain TopK at inference" and "plain_topk" not in no_grads
    assert "--with-grads" in no_grads["selection_rule_note"]


def test_evaluation_gradients_equal_the_cached_gradients(hf_model, caches):
    """The gradient the CE evaluation computes for a g-SAE is the one `saewb cache --with-grads` stored."""
    from experiments.evaluation import clean_logits_and_hook_grads

    cache = load_cache(caches[0])
    tokens = torch.from_numpy(np.asarray(cache.tokens[:4]).astype(np.int64))
    bos = int(hf_model.tokenizer.bos_token_id)
    _, grads = clean_logits_and_hook_grads(hf_model, HOOK, tokens, bos)
    rows = grads[tokens != bos]  # cache rows are the non-BOS positions in order
    assert torch.allclose(rows, cache.rows(0, rows.shape[0], hook=HOOK, kind="grads"), rtol=1e-4, atol=1e-7)


def test_ce_of_a_g_sae_is_reported_for_both_rules(hf_model, caches, tmp_path):
    model, _ = train_run(run_cfg(caches, tmp_path, arch="gradient_topk", eval_activations=str(caches[0]),
                                 total_tokens=1024))
    tokens = np.asarray(load_cache(caches[1]).tokens[:4])
    both = sae_in_the_loop(hf_model, model, HOOK, tokens)
    spec = resolve_hooks(hf_model, [HOOK])[0]
    plain = model_in_the_loop(hf_model, spec, lambda rows: model(rows), tokens, int(hf_model.tokenizer.bos_token_id))
    assert both["ce_selection_rule"] == "gradient selection"
    assert both["plain_topk"]["ce_selection_rule"] == "plain TopK at inference"
    assert both["plain_topk"]["ce_loss_sae"] == pytest.approx(plain["ce_loss_sae"], rel=1e-6)
    assert both["ce_loss_sae"] != pytest.approx(plain["ce_loss_sae"], rel=1e-6)
    assert both["ce_loss_clean"] == pytest.approx(plain["ce_loss_clean"], rel=1e-6)  # one clean run serves both


def test_splices_restart_after_the_shared_prefix_and_match_the_hooked_forward(hf_model, caches, monkeypatch):
    """At a residual hook every splice runs only the blocks after it; CE and KL equal those of a hooked full
    forward per splice (to float tolerance), for several reconstructions at once and the zero ablation."""
    assert restart_layer(hf_model, HOOK) == 2
    assert restart_layer(hf_model, "blocks.1.hook_resid_pre") == 1
    assert restart_layer(hf_model, "blocks.1.mlp.hook_post") is None
    spec = resolve_hooks(hf_model, [HOOK])[0]
    tokens = np.asarray(load_cache(caches[1]).tokens[:6])
    bos = int(hf_model.tokenizer.bos_token_id)
    named = {"half": lambda rows, g: 0.5 * rows, "noisy": lambda rows, g: rows + 0.1 * torch.sin(rows)}
    shared = in_the_loop_reports(hf_model, spec, named, tokens, bos, batch_size=4)
    monkeypatch.setattr(evaluation, "restart_layer", lambda model, hook: None)
    hooked = in_the_loop_reports(hf_model, spec, named, tokens, bos, batch_size=4)
    for name in named:
        assert shared[name]["ce_contexts"] == 6 and shared[name]["ce_eval_tokens"] == hooked[name]["ce_eval_tokens"]
        for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "kl_div", "kl_div_zero"):
            assert shared[name][key] == pytest.approx(hooked[name][key], rel=1e-5, abs=1e-6), (name, key)
    assert shared["half"]["ce_loss_sae"] != pytest.approx(shared["noisy"]["ce_loss_sae"], rel=1e-4)


def test_ce_and_kl_from_the_shared_clean_reference_match_float64():
    gen = torch.Generator().manual_seed(0)
    clean, new = (3 * torch.randn(2, 7, 50, generator=gen) for _ in range(2))
    tokens = torch.randint(0, 50, (2, 7), generator=gen)
    mask = (torch.rand(2, 6, generator=gen) > 0.3).float()
    ce, kl = ce_and_kl(new, clean_reference(clean), tokens, mask)
    p64, q64 = clean[:, :-1].double().log_softmax(-1), new[:, :-1].double().log_softmax(-1)
    want_kl = ((p64.exp() * (p64 - q64)).sum(-1) * mask.double()).sum()
    want_ce = (-q64.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1) * mask.double()).sum()
    assert ce == pytest.approx(float(want_ce), rel=1e-6) and kl == pytest.approx(float(want_kl), rel=1e-5)
    assert ce_and_kl(clean, clean_reference(clean), tokens, mask)[1] == pytest.approx(0.0, abs=1e-5)


def test_several_saes_scored_together_equal_each_scored_alone(hf_model, caches, tmp_path):
    """saes_in_the_loop shares the clean and zero runs; each SAE's numbers are those of sae_in_the_loop alone."""
    tokens = np.asarray(load_cache(caches[1]).tokens[:4])
    a, _ = train_run(run_cfg(caches, tmp_path / "a", total_tokens=1024))
    b, _ = train_run(run_cfg(caches, tmp_path / "b", arch="mutual_choice", total_tokens=1024))
    together = saes_in_the_loop(hf_model, {"a": a, "b": b}, HOOK, tokens)
    for name, model in (("a", a), ("b", b)):
        alone = sae_in_the_loop(hf_model, model, HOOK, tokens)
        assert together[name]["ce_loss_sae"] == pytest.approx(alone["ce_loss_sae"], rel=1e-6)
        assert together[name]["kl_div"] == pytest.approx(alone["kl_div"], rel=1e-6, abs=1e-9)
    assert together["a"]["ce_selection_rule"] == "TopK"
    assert together["b"]["ce_selection_rule"] == "thresholds (JumpReLU)"


def test_zero_ablation_of_bos_is_an_option(hf_model, caches):
    """SAELens' get_recons_loss zeroes BOS too; ours zeroes only the spliced (non-BOS) positions by default."""
    spec = resolve_hooks(hf_model, [HOOK])[0]
    tokens = np.asarray(load_cache(caches[1]).tokens[:4])
    bos = int(hf_model.tokenizer.bos_token_id)
    ours = model_in_the_loop(hf_model, spec, lambda x: x, tokens, bos)
    saelens = model_in_the_loop(hf_model, spec, lambda x: x, tokens, bos, zero_ablate_bos=True)
    assert not ours["zero_ablate_bos"] and saelens["zero_ablate_bos"]
    assert saelens["ce_loss_zero"] != pytest.approx(ours["ce_loss_zero"], rel=1e-4)
    assert saelens["ce_loss_clean"] == ours["ce_loss_clean"] and saelens["ce_loss_recovered"] == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_runs_calibrate_on_contexts_spread_over_the_training_cache(caches, tmp_path, arch):
    """Bug fixed: thresholds were calibrated on the eval-cache rows after the metric rows (a few documents, so FC
    missed k by 10% on the metric rows); now on whole contexts spread over the training cache, with the target
    L0 reached on that sample."""
    cfg = run_cfg(caches, tmp_path, arch=arch, total_tokens=1024, options={**FAST, "calibration_rows": 256})
    model, metrics = train_run(cfg)
    record = metrics["calibration"]
    train = load_cache(caches[0])
    rows, n_contexts = train.spread_rows(256, hook=HOOK)
    assert record["rows"] == rows.shape[0] == 256 and n_contexts > 1
    assert record["source"] == f"{caches[0]}: 256 rows of {n_contexts} contexts spread over the training cache"
    assert record["reached_l0"] == pytest.approx(4, abs=0.02)  # FC: 256 rows x 1/16 of them = 16 per latent
    assert float((model.encode(rows) > 0).sum()) / 256 == pytest.approx(record["reached_l0"])
    assert model.training_info["calibration"] == record


def test_saewb_calibrate_rewrites_thresholds_and_records_the_sample(caches, tmp_path, capsys):
    train_run(run_cfg(caches, tmp_path, arch="mutual_choice", total_tokens=1024))
    folder = tmp_path / "run"
    code, out, err = cli(capsys, "calibrate", "--sae", folder, "--activations", caches[1], "--target-l0", "3")
    assert code == 0, err
    record = json.loads(out)
    n = load_cache(caches[1]).n_tokens
    assert record["rows"] == n and record["target_l0"] == 3.0 and record["reached_l0"] == pytest.approx(3.0)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["workbench"]["training"]["calibration"] == record
    assert not list(folder.glob(".*.tmp"))  # written through temp names, none left behind
    reloaded = sae_lib.load(folder)
    assert sae_lib.evaluate(reloaded, load_cache(caches[1]).rows(0, n))["l0"] == pytest.approx(3.0, abs=1e-9)


@pytest.mark.parametrize(
    ("arch", "extra", "message"),
    [
        ("topk", [], "only mutual_choice and feature_choice SAEs have inference thresholds"),
        ("mutual_choice", ["--rows", "0"], "--rows must be >= 1 and --skip-rows >= 0, got 0 and 0"),
        ("mutual_choice", ["--skip-rows", "100000"], "--skip-rows 100000 leaves no rows"),
        ("mutual_choice", ["--target-l0", "-1"], "target_l0 must be in (0, n_features=64), got -1.0"),
    ],
)
def test_saewb_calibrate_bad_input_is_one_line_exit_2(caches, tmp_path, capsys, arch, extra, message):
    train_run(run_cfg(caches, tmp_path, arch=arch, total_tokens=512))
    before = (tmp_path / "run" / "sae_weights.safetensors").read_bytes()
    code, _, err = cli(capsys, "calibrate", "--sae", tmp_path / "run", "--activations", caches[1], *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("saewb calibrate: error: "), err
    assert message in err
    assert (tmp_path / "run" / "sae_weights.safetensors").read_bytes() == before  # nothing changed on disk


def test_lr_selection_picks_the_lowest_validation_fvu_on_rows_apart_from_the_test_rows(tmp_path, monkeypatch):
    seen = []

    def fake_train_run(cfg, log_fn=None):  # validation FVU: a bowl with its minimum at 2x the default lr
        seen.append(cfg)
        ratio = cfg.lr / sae_lib.default_lr(cfg.n_features)
        return None, {"fvu": 0.3 + (np.log2(ratio) - 1) ** 2 / 10}

    monkeypatch.setattr(compare_runs, "train_run", fake_train_run)
    base = RunConfig(activations="c", out=str(tmp_path), n_features=64, k=4, eval_activations="e", eval_tokens=1000)
    runs = plan_runs(base, "g", "eg", seeds=[0, 1], labels=["topk", "gradient_topk"])
    chosen = compare_runs.select_learning_rates(runs, [0.5, 1, 2], tokens=512, validation_rows=300, out=tmp_path,
                                           validation_activations="e")
    assert chosen == {"topk": pytest.approx(2 * sae_lib.default_lr(64)), "gradient_topk": pytest.approx(
        2 * sae_lib.default_lr(64))}
    assert len(seen) == 6 and {c.seed for c in seen} == {0}  # one trial per label and multiplier, first seed
    assert all(c.eval_offset == 1000 and c.eval_tokens == 300 and c.total_tokens == 512 for c in seen)
    assert all(c.eval_activations == "e" for c in seen)  # g-SAE validates on the main eval cache too
    report = json.loads((tmp_path / "lr_selection.json").read_text())
    assert report["topk"]["chosen_multiplier"] == 2 and set(report["topk"]["validation_fvu_by_multiplier"]) == {
        "0.5", "1", "2"}


def test_eval_offset_scores_later_rows_and_bad_offsets_are_refused(caches, tmp_path):
    _, metrics = train_run(run_cfg(caches, tmp_path, total_tokens=512, eval_offset=64, eval_tokens=100))
    assert metrics["eval_offset"] == 64 and metrics["eval_rows"] == 100
    with pytest.raises(sae_lib.SAEConfigError, match="eval_offset must be an integer >= 0, got -1"):
        run_cfg(caches, tmp_path, eval_offset=-1)


def test_report_only_trains_nothing_and_keeps_finished_runs(caches, tmp_path, monkeypatch):
    base = run_cfg(caches, tmp_path, total_tokens=512)
    runs = plan_runs(replace_out(base, tmp_path / "cmp"), None, labels=["topk", "mutual_choice"])
    compare_runs.run_comparison(runs[:1], None, 0)  # only topk has finished
    monkeypatch.setattr(compare_runs, "train_run", lambda *a, **k: pytest.fail("report_only must not train"))
    rows = compare_runs.run_comparison(runs, None, 0, report_only=True)
    assert [r["run"] for r in rows] == ["topk"]


def test_finished_runs_calibrated_by_an_older_rule_are_recalibrated_not_retrained(caches, tmp_path, monkeypatch):
    base = run_cfg(caches, tmp_path, total_tokens=512)
    runs = plan_runs(replace_out(base, tmp_path / "cmp"), None, labels=["topk", "feature_choice"])
    compare_runs.run_comparison(runs, None, 0)
    fc_folder = Path(runs[1][1].out)
    weights = (fc_folder / "sae_weights.safetensors").read_bytes()
    fresh = json.loads((fc_folder / "eval.json").read_text())
    old = {**fresh, "l0": 99.0, "calibration": {**fresh["calibration"], "source": "eval rows 0-100 (held out)"}}
    (fc_folder / "eval.json").write_text(json.dumps(old))
    monkeypatch.setattr(compare_runs, "train_run", lambda *a, **k: pytest.fail("a finished run must not be retrained"))
    rows = compare_runs.run_comparison(runs, None, 0)
    again = json.loads((fc_folder / "eval.json").read_text())
    assert again["calibration"] == fresh["calibration"] and again["l0"] == fresh["l0"]
    assert again["train_seconds"] == fresh["train_seconds"] and [r["l0"] for r in rows][1] == fresh["l0"]
    # The dictionary is the trained one; only the thresholds were rewritten (to the same values here).
    assert (fc_folder / "sae_weights.safetensors").read_bytes() == weights
    # A record of the current rule is reused as it is, and so is every TopK run.
    assert not compare_runs.stale_calibration("feature_choice", again)
    assert not compare_runs.stale_calibration("topk", old)


def test_report_only_leaves_out_runs_it_would_have_to_recalibrate(caches, tmp_path, monkeypatch, capsys):
    """--report-only computes nothing, so it can run beside the comparison that is recalibrating runs."""
    base = run_cfg(caches, tmp_path, total_tokens=512)
    runs = plan_runs(replace_out(base, tmp_path / "cmp"), None, labels=["topk", "feature_choice"])
    compare_runs.run_comparison(runs, None, 0)
    eval_path = Path(runs[1][1].out) / "eval.json"
    old = json.loads(eval_path.read_text())
    old["calibration"]["source"] = "eval rows 0-100 (held out)"
    eval_path.write_text(json.dumps(old))
    monkeypatch.setattr(compare_runs, "finish_run", lambda *a, **k: pytest.fail("report_only must not recalibrate"))
    rows = compare_runs.run_comparison(runs, None, 0, report_only=True)
    assert [r["run"] for r in rows] == ["topk"]
    err = capsys.readouterr().err
    assert "calibrated by an older rule (a run without --report-only recalibrates it), left out" in err
    assert json.loads(eval_path.read_text()) == old


def test_comparison_scores_ce_of_all_runs_together_and_again_only_on_more_contexts(
    hf_model, caches, tmp_path, monkeypatch, capsys
):
    base = run_cfg(caches, tmp_path, total_tokens=512)
    runs = plan_runs(replace_out(base, tmp_path / "cmp"), None, labels=["topk", "mutual_choice"])
    calls = []
    real = compare_runs.saes_in_the_loop

    def counted(model, saes, *args, **kwargs):
        calls.append(sorted(saes))
        return real(model, saes, *args, **kwargs)

    monkeypatch.setattr(compare_runs, "saes_in_the_loop", counted)
    rows = compare_runs.run_comparison(runs, hf_model, 2 * CONTEXT)
    assert calls == [sorted(cfg.out for _, cfg in runs)]  # one shared pass for both runs
    for (_, cfg), row in zip(runs, rows, strict=True):
        saved = json.loads((Path(cfg.out) / "eval.json").read_text())
        assert saved["ce_contexts"] == 2 and row["ce_eval_tokens"] == saved["ce_eval_tokens"] > 0
    assert rows[0]["ce_loss_clean"] == rows[1]["ce_loss_clean"]  # the same contexts: paired
    compare_runs.run_comparison(runs, hf_model, 2 * CONTEXT)
    assert len(calls) == 1  # kept: scored on as many contexts already
    rows = compare_runs.run_comparison(runs, hf_model, 3 * CONTEXT, report_only=True)
    assert rows == [] and "no CE/KL on 3 contexts yet, left out" in capsys.readouterr().err
    compare_runs.run_comparison(runs, hf_model, 3 * CONTEXT)
    assert len(calls) == 2
    assert json.loads((Path(runs[0][1].out) / "eval.json").read_text())["ce_contexts"] == 3


def replace_out(cfg: RunConfig, out) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, out=str(out))


@pytest.mark.parametrize("command", ["cache", "train", "analyze", "sweep", "demo"])
def test_out_pointing_at_an_existing_file_is_one_line_exit_2(tmp_path, capsys, command):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    extra = {"cache": [], "train": ["--activations", str(tmp_path)], "analyze": ["--sae", "x", "--activations", "y"],
             "sweep": ["experiments/sweeps/topk_k_grid.yaml", "--no-wandb"], "demo": []}[command]
    code = main([command, *extra, "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--out {target} is an existing file" in err
    assert target.read_text() == "keep me"
    with pytest.raises(sae_lib.SAEConfigError, match="is an existing file"):
        RunConfig(activations="c", out=str(target))


def test_saewb_steer_json_scores_each_coefficient(caches, tmp_path, capsys, corpus_txt):
    train_run(run_cfg(caches, tmp_path, total_tokens=1024))
    args = ["steer", "--sae", tmp_path / "run", "--features", "0,3", "--coefficients", "0,4,-4", "--json",
            "--contexts", "2", "--context-length", "16", "--new-tokens", "3", "--corpus", corpus_txt]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    result = json.loads(out)
    assert result["features"] == [0, 3] and result["hook"] == HOOK and result["neutral_tokens"] == 32
    sweep = result["sweep"]
    assert [p["coefficient"] for p in sweep] == [0.0, 4.0, -4.0]
    assert all(set(p) >= {"coefficient", "effect", "kl", "delta_ce", "text"} for p in sweep)
    assert sweep[0]["effect"] == 0.0 and sweep[0]["kl"] == 0.0 and sweep[0]["delta_ce"] == 0.0  # c = 0: exactly nothing
    assert sweep[1]["kl"] > 0 and sweep[2]["kl"] > 0
    # at the last block the direction reaches the logits through ln_final and W_U only: +c raises its top tokens
    assert sweep[1]["effect"] > 0 > sweep[2]["effect"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--features", "999", "--coefficients", "1"], "feature 999 is out of range: this SAE has features 0..63"),
        (["--features", "0", "--coefficients", "1,x"], "--coefficients must be comma-separated numbers"),
        (["--features", "0", "--coefficients", "1e9"], "must be a finite number with |c| <= 1000"),
        (["--features", "0", "--coefficients", "1", "--hook", "blocks.1.mlp.hook_post"], "the SAE has d_in=32 but"),
    ],
)
def test_saewb_steer_bad_input_is_one_line_exit_2(caches, tmp_path, capsys, corpus_txt, extra, message):
    train_run(run_cfg(caches, tmp_path, total_tokens=512))
    code, _, err = cli(capsys, "steer", "--sae", tmp_path / "run", "--contexts", "1", "--context-length", "8",
                       "--corpus", corpus_txt, *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("saewb steer: error: "), err
    assert message in err


def test_saewb_unlearn_json_reports_each_clamp_size(caches, tmp_path, capsys, corpus_txt):
    train_run(run_cfg(caches, tmp_path, total_tokens=1024))
    code, out, err = cli(capsys, "unlearn", "--sae", tmp_path / "run", "--concept", "the quick brown fox",
                         "--sizes", "0,1,4,16", "--json", "--contexts", "2", "--context-length", "16",
                         "--corpus", corpus_txt)
    assert code == 0, err
    points = json.loads(out)
    assert [p["n_features"] for p in points] == [0, 1, 4, 16]
    assert all(set(p) >= {"n_features", "forgetting", "kl", "delta_ce"} for p in points)
    # the char tokenizer has no three-letter word token: no containment rate
    assert points[0] == {"n_features": 0, "features": [], "forgetting": 0.0, "kl": 0.0, "delta_ce": 0.0,
                         "contained": None}
    assert [len(p["features"]) for p in points] == [0, 1, 4, 16]
    assert points[2]["features"][:1] == points[1]["features"]  # one ranking, clamped deeper and deeper
    assert points[3]["kl"] > 0


def test_the_most_selective_feature_is_the_one_that_fires_on_the_concept(hf_model, caches, tmp_path):
    from experiments.steering import prompt_tokens
    from experiments.unlearning import selective_features

    model, _ = train_run(run_cfg(caches, tmp_path, total_tokens=1024))
    concept = prompt_tokens(hf_model, "the quick brown fox")
    neutral = torch.from_numpy(np.asarray(load_cache(caches[1]).tokens[:2]).astype(np.int64))
    ranked = selective_features(hf_model, model, HOOK, concept, neutral)
    z_concept = model.encode(hf_model.run_with_cache(concept, names_filter=[HOOK])[1][HOOK][0, 1:]).mean(0)
    bos = int(hf_model.tokenizer.bos_token_id)
    z_neutral = torch.cat([model.encode(hf_model.run_with_cache(r[None], names_filter=[HOOK])[1][HOOK][0][r != bos])
                           for r in neutral]).mean(0)
    assert int(ranked[0]) == int(torch.argmax(z_concept - z_neutral))


def test_saewb_unlearn_bad_input_is_one_line_exit_2(caches, tmp_path, capsys, corpus_txt):
    train_run(run_cfg(caches, tmp_path, total_tokens=512))
    for extra, message in [(["--sizes", "1,x"], "--sizes must be comma-separated integers"),
                           (["--sizes", "999"], "clamp sizes must be in 0..64"),
                           (["--concept", "a"], "the concept text needs at least two tokens"),
                           (["--generation-tokens", "-1"], "--generation-tokens must be in 0..200, got -1")]:
        args = ["unlearn", "--sae", tmp_path / "run", "--concept", "the fox", "--contexts", "1", "--context-length",
                "8", "--corpus", corpus_txt, *extra]
        code, _, err = cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_claim_verdicts_follow_the_interval():
    assert verdict((-0.02, 0.01), "lower") == "reproduced"
    assert verdict((0.02, 0.01), "lower") == "not reproduced"
    assert verdict((-0.005, 0.01), "lower") == "inconclusive (interval spans 0)"
    assert verdict((0.002, 0.003), "zero") == "reproduced" and verdict((0.02, 0.001), "zero") == "not reproduced"
    assert verdict((0.001, 0.002), "not higher") == "reproduced" and verdict((0.01, 0.002), "not higher") == (
        "not reproduced")
    assert verdict((0.1, float("nan")), "lower") == "one seed: no interval"
    summaries = [{"run": "mutual_choice", "k": 32, "seeds": [0, 1, 2], "fvu_vs_topk": (-0.02, 0.01)}]
    table = claims_table(summaries)
    assert "| MC FVU ≤ TopK at equal L0 (Ayonrinde; BatchTopK, Bussmann) | 32 | mutual_choice − topk (fvu) | " \
           "-0.0200 ± 0.0100 | 3 | reproduced |" in table


def test_report_only_reads_the_recorded_lr_choice_and_never_trains_trials(tmp_path, monkeypatch):
    args = ["--activations", "c", "--out", str(tmp_path), "--lr-multipliers", "0.5", "1", "--report-only",
            "--model", "none", "--runs", "topk"]
    assert compare_main(args) == 2  # no lr_selection.json yet: one clear error instead of training trials
    (tmp_path / "lr_selection.json").write_text(json.dumps({"topk": {"chosen_lr": 1e-3}}))
    seen = []
    monkeypatch.setattr(compare_runs, "_finished", lambda cfg: seen.append(cfg.lr) or False)
    assert compare_main(args) == 0  # nothing finished: an empty report, nothing trained
    assert not (tmp_path / "lr-select").exists()
    assert seen == [1e-3]  # the runs it looks for are those trained at the recorded lr


def test_a_per_sequence_position_mask_steers_only_the_selected_positions():
    """Unlearning steers every non-BOS token of neutral contexts, whose BOS can sit mid-sequence: the hook takes
    a [sequences, positions] mask as well as a [positions] one."""
    from experiments.steering import feature_directions, steering_hook

    model = sae_lib.get_architecture("topk")(sae_lib.SAEConfig(arch="topk", d_in=8, n_features=16, k=2,
                                                               normalization="none"), seed=0)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0, 1, 1, 1], [1, 1, 1, 0, 1]])
    direction = feature_directions(model, [3])
    out = steering_hook(model, [3], torch.full((2, 1), 2.0), direction, "add", lambda seq_len: mask)(x, None)
    assert torch.equal(out[mask == 0], x[mask == 0])
    assert torch.allclose(out[mask == 1], x[mask == 1] + 2.0 * direction[0], atol=1e-6)


def test_ce_differences_pair_only_runs_scored_on_the_same_tokens():
    def row(label, seed, fvu, delta_ce, tokens):
        return {"run": label, "label": label, "k": 32, "seed": seed, "fvu": fvu, "delta_ce": delta_ce,
                "ce_eval_tokens": tokens}

    rows = [row("topk", s, 0.2, 0.5, 101_600) for s in (0, 1)]
    rows += [row("mutual_choice", 0, 0.25, 0.6, 101_600), row("mutual_choice", 1, 0.26, 0.7, 4_064)]
    mc = next(s for s in aggregate(rows) if s["run"] == "mutual_choice")
    assert mc["fvu_vs_topk"][0] == pytest.approx(0.055)  # both seeds pair on FVU
    assert mc["delta_ce_vs_topk"][0] == pytest.approx(0.1)  # only seed 0 pairs on ΔCE: one value, no interval
    assert mc["delta_ce_vs_topk"][1] != mc["delta_ce_vs_topk"][1]
    assert mc["ce_eval_tokens"] == 4_064


def test_lr_selection_of_a_subset_of_runs_keeps_the_other_labels_choice(tmp_path, monkeypatch):
    fvu = {0.5: 0.3, 1.0: 0.2, 2.0: 0.25}
    monkeypatch.setattr(compare_runs, "_train_or_reuse",
                        lambda label, cfg: (None, {"fvu": fvu[round(cfg.lr / 1e-3, 3)]}))
    base = RunConfig(activations="c", out=str(tmp_path), n_features=64, k=4, lr=1e-3)
    runs = plan_runs(base, None, labels=["topk", "mutual_choice"])
    compare_runs.select_learning_rates(runs, [0.5, 1, 2], 100, 10, tmp_path)
    compare_runs.select_learning_rates(runs[:1], [0.5, 1, 2], 100, 10, tmp_path)
    assert compare_runs.read_lr_selection(tmp_path, ["topk", "mutual_choice"]) == {"topk": 1e-3, "mutual_choice": 1e-3}


def test_generation_containment_counts_prompts_whose_greedy_continuation_holds_a_concept_token(hf_model, caches,
                                                                                                tmp_path):
    from experiments.steering import generate_continuations
    from experiments.unlearning import concept_token_ids, containment, generation_prompts

    model, _ = train_run(run_cfg(caches, tmp_path, total_tokens=1024))
    neutral = torch.from_numpy(np.asarray(load_cache(caches[1]).tokens[:3]).astype(np.int64))
    concept = torch.tensor([[2, 10, 11, 12, 13]])
    prompts = generation_prompts(concept, neutral, n_neutral=3, length=5)
    assert [p.shape[1] for p in prompts] == [3, 5, 5, 5] and torch.equal(prompts[0], concept[:, :3])
    clean = [generate_continuations(hf_model, p, [], 1, 6, 0.0, 1.0, 0, [0])[0] for p in prompts]
    wanted = set(clean[0][:1])  # the first token the clean model writes after the concept prompt
    expected = sum(any(t in wanted for t in c) for c in clean) / 4
    assert containment(hf_model, model, HOOK, [], 0.0, prompts, wanted, 6) == expected >= 1 / 4
    clamped = containment(hf_model, model, HOOK, list(range(64)), 0.0, prompts, wanted, 6)
    assert 0.0 <= clamped <= 1.0

    class WordTokenizer:  # ids 10.. decode to words; "of" and "tree" (in a neutral context) never count
        words = {10: " Moses", 11: " of", 12: " tree", 13: "!!!", 14: " Egypt"}

        def decode(self, ids):
            return self.words[ids[0]]

    class Model:
        tokenizer = WordTokenizer()

    assert concept_token_ids(Model(), torch.tensor([[2, 10, 11, 12, 13, 14]]), torch.tensor([[2, 12]])) == {10, 14}


def test_a_finished_run_is_reused_whatever_device_trained_it(caches, tmp_path, monkeypatch):
    base = run_cfg(caches, tmp_path, total_tokens=512)
    runs = plan_runs(replace_out(base, tmp_path / "cmp"), None, labels=["topk"])
    compare_runs.run_comparison(runs, None, 0)
    monkeypatch.setattr(compare_runs, "train_run", lambda *a, **k: pytest.fail("a finished run must be reused"))
    on_cpu = [(label, dataclasses.replace(cfg, options={**cfg.options, "device": "cpu"})) for label, cfg in runs]
    assert compare_runs.run_comparison(on_cpu, None, 0)[0]["run"] == "topk"
    in_bf16 = [(label, dataclasses.replace(cfg, options={**cfg.options, "autocast": "bf16"})) for label, cfg in runs]
    assert not compare_runs._finished(in_bf16[0][1])  # autocast changes the numbers: not the same run


def test_a_run_from_before_a_default_changed_is_reused_when_the_plan_names_the_value_it_got(caches, tmp_path,
                                                                                            monkeypatch):
    """The comparison's feature_choice label now names fc_capacity=uniform (zipf became the default); a finished run
    whose options left it to the default is the same run when cfg.json records the value the plan now names."""
    cfg = run_cfg(caches, tmp_path, arch="feature_choice", total_tokens=512, options={})
    compare_runs.run_comparison([("feature_choice", cfg)], None, 0)
    got = json.loads((Path(cfg.out) / "cfg.json").read_text())["workbench"]["config"]["fc_capacity"]
    assert got == "zipf"  # today's default
    assert compare_runs._finished(dataclasses.replace(cfg, options={"fc_capacity": "zipf"}))
    assert not compare_runs._finished(dataclasses.replace(cfg, options={"fc_capacity": "uniform"}))
    assert not compare_runs._finished(dataclasses.replace(cfg, options={"fc_zipf_s": 2.0}))
    monkeypatch.setattr(compare_runs, "train_run", lambda *a, **k: pytest.fail("a finished run must be reused"))
    named = [("feature_choice+zipf", dataclasses.replace(cfg, options={"fc_capacity": "zipf"}))]
    assert compare_runs.run_comparison(named, None, 0)[0]["run"] == "feature_choice+zipf"


def test_ce_scored_before_ce_contexts_was_recorded_counts_by_its_scored_positions(caches, tmp_path):
    """Bug fixed: runs scored before eval.json recorded ce_contexts were rescored, because their token count was
    read as 127 per context; contexts holding several documents score fewer (a BOS target is no prediction)."""
    cfg = run_cfg(caches, tmp_path)
    scored = compare_runs.scored_tokens(cfg, 4)
    tokens = np.asarray(load_cache(caches[1]).tokens[:4])
    assert scored == int((tokens[:, 1:] != int(load_cache(caches[1]).manifest["bos_token_id"])).sum())
    old = {"ce_loss_recovered": 0.9, "ce_eval_tokens": scored}
    assert compare_runs.has_ce(old, 4, cfg) and not compare_runs.has_ce({**old, "ce_eval_tokens": scored - 1}, 4, cfg)
    assert compare_runs.has_ce({"ce_loss_recovered": 0.9, "ce_contexts": 4}, 4)
    assert not compare_runs.has_ce({"ce_loss_recovered": 0.9, "ce_contexts": 3}, 4, cfg)
