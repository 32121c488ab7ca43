"""``saewb cache`` end to end on a tiny local Hugging Face model folder, and its one-line user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BOS_ID

from activations.models import ModelLoadError, load_model
from activations.reader import load_cache
from experiments.cli import cache as cache_command
from experiments.cli import main

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(autouse=True)
def _isolated(isolated_cache_root, datasets_tmp_cache):
    """The CLI must not touch the user's model/corpus cache or datasets' arrow cache."""


@pytest.fixture(scope="module")
def hf_tl_model(tiny_hf_folder):
    return load_model(str(tiny_hf_folder))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(capsys, argv: list[str], message: str) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    line = err.rstrip("\n")
    assert line.startswith("saewb cache: error: ")
    assert message in line, line
    return line


def test_unknown_dtype(tmp_path, capsys):
    line = assert_one_error_line(capsys, ["cache", "--out", str(tmp_path / "c"), "--dtype", "float8"], "unknown dtype")
    assert line == "saewb cache: error: unknown dtype 'float8'; allowed: float32, float16, bfloat16"
    assert not (tmp_path / "c").exists()


def test_tokens_below_context(tmp_path, capsys):
    line = assert_one_error_line(
        capsys, ["cache", "--out", str(tmp_path / "c"), "--tokens", "100", "--context", "128"], "--tokens"
    )
    assert line == "saewb cache: error: --tokens 100 is smaller than one context of 128 tokens; ask for at least 128"


def test_unknown_hook_lists_nearest(tmp_path, capsys, tiny_hf_folder):
    line = assert_one_error_line(
        capsys,
        ["cache", "--model", str(tiny_hf_folder), "--hook", "blocks.1.hook_resid_pots", "--out", str(tmp_path / "c")],
        "unknown hook",
    )
    assert line.startswith(
        f"saewb cache: error: unknown hook 'blocks.1.hook_resid_pots' for {tiny_hf_folder.name} (2 layers); "
        "nearest: blocks.1.hook_resid_post, "
    )


def test_hook_beyond_the_last_layer(tmp_path, capsys, tiny_hf_folder):
    line = assert_one_error_line(
        capsys,
        ["cache", "--model", str(tiny_hf_folder), "--hook", "blocks.5.hook_resid_post", "--out", str(tmp_path / "c")],
        "unknown hook",
    )
    nearest = line.split("nearest: ")[1].split(", ")
    assert "blocks.0.hook_resid_post" in nearest and "blocks.1.hook_resid_post" in nearest


def test_empty_corpus_file(tmp_path, capsys, tiny_hf_folder):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = ["cache", "--model", str(tiny_hf_folder), "--hook", HOOK, "--dataset", str(empty)]
    line = assert_one_error_line(capsys, [*argv, "--out", str(tmp_path / "c")], "is empty")
    assert line == f"saewb cache: error: corpus file {str(empty)!r} is empty: it holds no text to tokenise"


def test_corpus_too_small(tmp_path, capsys, tiny_hf_folder):
    small = tmp_path / "small.txt"
    small.write_text("Just a few words.\n")
    line = assert_one_error_line(
        capsys,
        ["cache", "--model", str(tiny_hf_folder), "--hook", HOOK, "--dataset", str(small), "--tokens", "256",
         "--context", "32", "--out", str(tmp_path / "c")],
        "ran out",
    )  # fmt: skip
    # 17 characters, the newline that datasets' paragraph reader keeps, and the context's own BOS.
    assert line == (
        "saewb cache: error: the corpus ran out after 19 tokens, but 8 contexts of 32 tokens (256) were asked for: "
        "lower --tokens or use a larger corpus"
    )


def test_unknown_model(tmp_path, capsys):
    line = assert_one_error_line(
        capsys, ["cache", "--model", "no-such-model-xyz", "--out", str(tmp_path / "c")], "unknown model"
    )
    assert line == (
        "saewb cache: error: unknown model 'no-such-model-xyz': use one of the offline models "
        "['smollm2-135m', 'gemma-3-270m'], a local Hugging Face model folder, or a transformer_lens model name "
        "such as 'gpt2'"
    )


def test_folder_without_config(tmp_path, capsys):
    bare = tmp_path / "not-a-model"
    bare.mkdir()
    line = assert_one_error_line(capsys, ["cache", "--model", str(bare), "--out", str(tmp_path / "c")], "config")
    assert line == f"saewb cache: error: {bare} is a folder but has no config.json, so it is not a HF model folder"


def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        main(["cache", "--model", "smollm2-135m"])
    assert info.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(cfg, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_command, "build_cache", interrupted)
    code, out, err = run_cli(capsys, "cache", "--out", str(tmp_path / "c"))
    assert code == 130
    assert err == "saewb: interrupted; rerun the same command to resume from the last complete step\n"


def test_cache_command_end_to_end(tmp_path, capsys, tiny_hf_folder, corpus_txt, hf_tl_model):
    out = tmp_path / "cache"
    argv = ["cache", "--model", str(tiny_hf_folder), "--hook", HOOK, "--dataset", str(corpus_txt),
            "--tokens", "512", "--context", "32", "--out", str(out), "--quiet"]  # fmt: skip
    code, stdout, stderr = run_cli(capsys, *argv)
    assert (code, stdout, stderr) == (0, "", "")
    cache = load_cache(out)
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (16, 32) and (tokens[:, 0] == BOS_ID).all()
    assert cache.n_tokens == int((tokens != BOS_ID).sum()) and 16 * 31 - 16 < cache.n_tokens < 16 * 31
    assert cache.d_in == 32 and cache.hooks == [HOOK] and cache.model == str(tiny_hf_folder)
    manifest = cache.manifest
    assert (manifest["batch_size"], manifest["seed"], manifest["dtype"], manifest["with_grads"]) == (
        32,
        0,
        "float32",
        False,
    )
    assert manifest["corpus"] == str(corpus_txt) and manifest["n_layers"] == 2
    # The rows are the converted model's activations.
    batch = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        _, acts = hf_tl_model.run_with_cache(batch, names_filter=[HOOK])
    torch.testing.assert_close(cache.rows(0, cache.n_tokens), acts[HOOK][batch != BOS_ID], rtol=0, atol=1e-5)

    # The same command again: nothing to do, nothing rewritten.
    before = (out / "manifest.json").read_bytes()
    assert run_cli(capsys, *argv) == (0, "", "")
    assert (out / "manifest.json").read_bytes() == before
    # Another seed into the same folder: refused, naming the key.
    line = assert_one_error_line(capsys, [*argv, "--seed", "1"], "already holds a different activation cache")
    assert "(seed: cache has 0, asked 1)" in line


def test_cache_command_two_hooks_with_grads(tmp_path, capsys, tiny_hf_folder, corpus_txt):
    out = tmp_path / "cache"
    code, _, err = run_cli(
        capsys, "cache", "--model", str(tiny_hf_folder), "--hooks", "blocks.0.attn.hook_z", "--hook", HOOK,
        "--corpus", str(corpus_txt), "--tokens", "128", "--context", "32", "--with-grads", "--dtype", "bfloat16",
        "--batch-size", "2", "--shard-contexts", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert "[saewb] cached" in err  # without --quiet the summary is printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hooks"] == ["blocks.0.attn.hook_z", HOOK]
    assert manifest["d_in"] == {"blocks.0.attn.hook_z": 32, HOOK: 32}  # 4 heads of 8
    assert (manifest["n_shards"], manifest["batch_size"], manifest["dtype"], manifest["with_grads"]) == (
        2,
        2,
        "bfloat16",
        True,
    )
    cache = load_cache(out)
    acts, grads = next(cache.iter_batches(16, hook=HOOK))
    assert acts.shape == grads.shape == (16, 32)


def test_load_model_local_folder_matches_hf(tiny_hf_folder, hf_tl_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_folder, dtype=torch.float32).eval()
    assert hf_tl_model.cfg.n_layers == 2 and hf_tl_model.cfg.d_model == 32 and hf_tl_model.cfg.n_heads == 4
    assert not hf_tl_model.training
    assert not any(p.requires_grad for p in hf_tl_model.parameters())
    assert hf_tl_model.saewb_name == str(tiny_hf_folder)
    ids = hf_tl_model.tokenizer("The quiet river, 42 stones.", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[BOS_ID, *ids]])
    assert tokens.shape[1] == 28
    with torch.no_grad():
        ours = hf_tl_model(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    assert theirs.std(-1).mean() > 0.5  # a peaked distribution, not near-uniform
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_load_model_unknown_name():
    with pytest.raises(ModelLoadError, match=r"^unknown model 'gpt-9000': use one of the offline models"):
        load_model("gpt-9000")


@pytest.mark.parametrize(
    "command", ["cache", "train", "eval", "calibrate", "steer", "unlearn", "sweep", "analyze", "dashboard", "demo"]
)
def test_every_command_help_renders(command, capsys):
    """argparse %-formats help text: a literal '%' in a config field's help must not break --help."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: saewb") and len(out.splitlines()) > 3
    if command == "train":
        assert "20% of the run" in out and "--sparse-kernels" in out
