"""`saewb ioi` (experiments/ioi.py): IOI prompts, supervised dictionaries, the splice's normalisations, F1, and the
command's one-line errors, on a tiny Llama whose word-level tokenizer knows some of the names as single tokens."""

from __future__ import annotations

import argparse
import itertools
import json
import re

import pytest
import torch
from conftest import BOS_ID, EOS_ID, PAD_ID, UNK_ID, page

import sae as sae_lib
from activations import load_model
from dashboard.views import ioi as ioi_page
from experiments.cli import ioi as ioi_cli
from experiments.ioi import (
    ATTRIBUTES,
    N_LATENTS,
    NAMES,
    TEMPLATES,
    IOIError,
    f1_table,
    make_prompts,
    necessity,
    node_run,
    run_ioi,
    sae_edit_codes,
    single_token_names,
    sufficiency,
    supervised_dictionary,
    tokenize_prompts,
)
from experiments.user_errors import run_user_command

HOOK = "blocks.0.hook_resid_post"
VOCAB_NAMES = NAMES[:8]
PIECE = re.compile(r" ?[A-Za-z]+|[^A-Za-z ]| ")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster, and repeatable


def word_tokenizer():
    """A word-level tokenizer (GPT-2-like pieces: a word with its leading space) over the templates and 8 names;
    every other name is the unknown token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = set()
    for template, names in itertools.product(TEMPLATES, itertools.permutations(VOCAB_NAMES[:3], 3)):
        pieces.update(PIECE.findall(template.format(*names)))
    pieces.update(" " + n for n in VOCAB_NAMES)
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pieces))}
    assert (vocab["<pad>"], vocab["<unk>"], vocab["<bos>"], vocab["<eos>"]) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE.pattern), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def ioi_folder(tmp_path_factory):
    """A 2-layer Llama with the word tokenizer, saved as a local HF folder (no "llama" in the path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
                         initializer_range=0.3)
    folder = tmp_path_factory.mktemp("ioi_hf_model")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(ioi_folder):
    return load_model(str(ioi_folder))


def make_sae(path, model_name: str | None, d_in: int = 32, hook: str = HOOK):
    out = sae_lib.get_architecture("topk")(sae_lib.SAEConfig(arch="topk", d_in=d_in, n_features=64, k=4,
                                                             normalization="none"), seed=0)
    out.metadata = {"hook_name": hook, "model_name": model_name} if model_name else {}
    out.save(path)
    return path


def saewb_ioi(capsys, *argv):
    parser = argparse.ArgumentParser(prog="saewb")
    sub = parser.add_subparsers(dest="command", required=True)
    ioi_cli.add_parser(sub)
    args = parser.parse_args(["ioi", *map(str, argv)])
    code = run_user_command(args.command, lambda: args.func(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompts_have_single_token_names_at_their_positions_and_one_attribute_changed(model):
    names = single_token_names(model.tokenizer)
    assert [n for n, _ in names] == list(VOCAB_NAMES)  # the unknown token is never a name
    prompts, cfs = make_prompts(40, len(names), seed=3)
    assert make_prompts(40, len(names), seed=3) == (prompts, cfs)
    assert make_prompts(40, len(names), seed=4)[0] != prompts
    assert {p.order for p in prompts} == {0, 1} and len({p.template for p in prompts}) == len(TEMPLATES)
    counts = torch.bincount(torch.tensor([p.io for p in prompts]), minlength=len(names))
    assert int(counts.max() - counts.min()) <= 1  # IO balanced
    for p in prompts:
        assert p.io != p.s
    for attribute in ATTRIBUTES:
        for p, c in zip(prompts, cfs[attribute], strict=True):
            assert c.template == p.template and c.io != c.s
            assert [a for a in ATTRIBUTES if c.label(a) != p.label(a)] == [attribute]
    ids, words = [i for _, i in names], [n for n, _ in names]
    for group in [prompts, *cfs.values()]:
        batches = tokenize_prompts(model.tokenizer, group, names)
        assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(40))
        for batch in batches:
            text = TEMPLATES[batch.template].format(*words[:3])
            length = 1 + len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
            assert batch.tokens.shape == (len(batch.index), length)  # one length per template
            for row, k in zip(batch.tokens, batch.index.tolist(), strict=True):
                p = group[k]
                assert int(row[0]) == BOS_ID and p.template == batch.template
                assert [int(row[s]) for s in batch.slots] == [ids[i] for i in p.names()]
                io_slot, s1_slot = (0, 1) if p.order == 0 else (1, 0)
                assert int(row[batch.slots[io_slot]]) == ids[p.io] and int(row[batch.slots[s1_slot]]) == ids[p.s]
                assert int(row[batch.slots[2]]) == ids[p.s]
                assert model.tokenizer.decode(row[1:].tolist()).replace(" ", "") == p.text(words).replace(" ", "")


def test_supervised_dictionary_reconstructs_its_attribute_means_exactly():
    gen = torch.Generator().manual_seed(0)
    n_values, d = {"io": 4, "s": 3, "pos": 2}, 5
    planted = {a: torch.randn(n, d, generator=gen, dtype=torch.float64) for a, n in n_values.items()}
    planted = {a: u - u.mean(0) for a, u in planted.items()}  # centred
    mean = torch.randn(d, generator=gen, dtype=torch.float64)
    grid = torch.tensor(list(itertools.product(*(range(n) for n in n_values.values()))))  # full factorial
    labels = {a: grid[:, i] for i, a in enumerate(n_values)}
    x = mean + sum(planted[a][labels[a]] for a in n_values)
    dictionary = supervised_dictionary(x, labels, n_values)
    torch.testing.assert_close(dictionary.mean, mean, rtol=0, atol=1e-12)
    for a in n_values:
        torch.testing.assert_close(dictionary.vectors[a], planted[a], rtol=0, atol=1e-12)
        for v in range(n_values[a]):  # E[x_hat | a = v] = E[x | a = v]
            rows = labels[a] == v
            torch.testing.assert_close(dictionary.reconstruct(labels)[rows].mean(0), x[rows].mean(0), rtol=0,
                                       atol=1e-12)
    torch.testing.assert_close(dictionary.reconstruct(labels), x, rtol=0, atol=1e-12)


def test_identity_is_sufficient_mean_ablation_is_not_and_a_zero_reconstruction_is_not_necessary(model):
    names = single_token_names(model.tokenizer)
    prompts, _ = make_prompts(24, len(names), seed=0)
    batches = tokenize_prompts(model.tokenizer, prompts, names)
    token_ids = torch.tensor([i for _, i in names])
    io, s = torch.tensor([p.io for p in prompts]), torch.tensor([p.s for p in prompts])
    rows = torch.arange(len(prompts))

    def ld(values=None):
        logits, acts = node_run(model, HOOK, batches, "s2", token_ids, values)
        return float((logits[rows, io] - logits[rows, s]).double().mean()), acts

    ld_clean, x = ld()
    ld_mean, _ = ld(x.mean(0).expand_as(x))
    assert abs(ld_clean - ld_mean) > 1e-4  # the node matters in this random model
    ld_identity, x_again = ld(x.clone())
    torch.testing.assert_close(x_again, x, rtol=0, atol=0)
    assert sufficiency(ld_identity, ld_clean, ld_mean) == pytest.approx(1.0, abs=1e-6)
    assert sufficiency(ld(x.mean(0).expand_as(x))[0], ld_clean, ld_mean) == 0.0
    zero = torch.zeros_like(x)
    assert necessity(ld(x - zero + zero.mean(0))[0], ld_clean, ld_mean) == pytest.approx(0.0, abs=1e-6)
    assert necessity(ld(x - x + x.mean(0))[0], ld_clean, ld_mean) == pytest.approx(1.0, abs=1e-6)
    assert sufficiency(ld_identity, ld_clean, ld_mean, min_effect=abs(ld_clean - ld_mean) + 1) is None


def test_f1_on_a_hand_made_activation_matrix():
    active = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    values = torch.tensor([0, 0, 1, 1, 1, 0])
    table = f1_table(active, values, 2)
    # latent 0: active on rows 0, 1, 4; value 0 rows 0, 1, 5 -> TP 2, P = 2/3, R = 2/3, F1 = 2/3
    # latent 1: active on 2, 3, 4 -> value 1: TP 3, P = 1, R = 1, F1 = 1; value 0: TP 0
    # latent 2: active on 0, 2 -> value 0: TP 1, P 1/2, R 1/3, F1 = 2/5; value 1: TP 1, P 1/2, R 1/3, F1 = 2/5
    torch.testing.assert_close(table["precision"], torch.tensor([[2 / 3, 0, 1 / 2], [1 / 3, 1, 1 / 2]],
                                                                dtype=torch.float64))
    torch.testing.assert_close(table["recall"], torch.tensor([[2 / 3, 0, 1 / 3], [1 / 3, 1, 1 / 3]],
                                                             dtype=torch.float64))
    torch.testing.assert_close(table["f1"], torch.tensor([[2 / 3, 0, 2 / 5], [1 / 3, 1, 2 / 5]], dtype=torch.float64))


def test_an_sae_edit_changes_at_most_n_latents_by_f1():
    z = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    f1 = torch.tensor([[0.9, 0.0, 0.3, 0.1], [0.0, 0.8, 0.5, 0.0]])  # value 0, value 1
    means = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 3.0, 4.0, 0.0]])
    old, new = torch.tensor([0]), torch.tensor([1])
    one, n1 = sae_edit_codes(z, old, new, f1, means, 1)
    assert one.tolist() == [[0.0, 0.0, 1.0, 0.0]] and n1.tolist() == [1]  # remove latent 0 (F1 0.9 for old)
    two, n2 = sae_edit_codes(z, old, new, f1, means, 2)
    assert two.tolist() == [[0.0, 3.0, 1.0, 0.0]] and n2.tolist() == [2]  # then add latent 1 at its new mean
    many, n9 = sae_edit_codes(z, old, new, f1, means, 9)
    assert many.tolist() == [[0.0, 3.0, 4.0, 0.0]] and n9.tolist() == [3]  # latent 2: first as an addition (0.5)
    tied = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # two perfect latents per value
    edit, n2 = sae_edit_codes(torch.tensor([[2.0, 3.0, 0.0, 0.0]]), old, new, tied, means, 2)
    assert edit.tolist() == [[0.0, 3.0, 4.0, 0.0]] and n2.tolist() == [2]  # equal F1s: remove one, add one


def test_saewb_ioi_json_reports_both_methods(model, ioi_folder, tmp_path, capsys):
    folder = make_sae(tmp_path / "sae", str(ioi_folder))
    code, out, err = saewb_ioi(capsys, "--sae", folder, "--prompts", 24, "--names", 6, "--n-latents", "1,4",
                               "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n_prompts"] == 24 and result["hook"] == HOOK and result["model"] == str(ioi_folder)
    assert result["names"] == list(VOCAB_NAMES[:6]) and 0 <= result["accuracy"] <= 1
    for key in ("sufficiency", "necessity"):
        assert set(result[key]) == {"sae", "supervised"}
    assert set(result["control"]["sae"]) == {"1", "4"} and set(result["control"]["supervised"]) == set(ATTRIBUTES)
    assert all(result["control"]["sae"]["1"][a]["changed"] <= 1 for a in ATTRIBUTES)
    assert set(result["f1"]) == set(ATTRIBUTES) and all(0 <= result["f1"][a]["mean"] <= 1 for a in ATTRIBUTES)
    code, out, err = saewb_ioi(capsys, "--sae", folder, "--prompts", 24, "--names", 6, "--n-latents", "2")
    assert code == 0 and "sufficiency" not in err and "supervised" in out and "sae n=2" in out, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "10", "--names", "8"], "--prompts 10 is too few for 8 names: give at least 16"),
        (["--n-latents", "0,2"], "--n-latents must be comma-separated positive integers, got '0,2'"),
        (["--n-latents", "a"], "--n-latents must be comma-separated positive integers, got 'a'"),
        (["--n-latents", "65"], "--n-latents 65 exceeds the SAE's 64 latents"),
    ],
)
def test_saewb_ioi_bad_requests_are_one_line_exit_2(ioi_folder, tmp_path, capsys, extra, message):
    folder = make_sae(tmp_path / "sae", str(ioi_folder))
    code, _, err = saewb_ioi(capsys, "--sae", folder, *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("saewb ioi: error: "), err
    assert message in err


def test_saewb_ioi_refuses_a_width_mismatch_missing_metadata_and_a_tokenizer_without_names(
        model, ioi_folder, tiny_hf_folder, tmp_path, capsys):
    make_sae(tmp_path / "sae", str(ioi_folder))
    narrow = make_sae(tmp_path / "narrow", str(ioi_folder), d_in=16)
    code, _, err = saewb_ioi(capsys, "--sae", narrow, "--prompts", 24, "--names", 6)
    assert code == 2 and err.count("\n") == 1, err
    assert f"the SAE {narrow} has d_in=16 but {ioi_folder}'s {HOOK} has width 32" in err

    bare = make_sae(tmp_path / "bare", None)
    code, _, err = saewb_ioi(capsys, "--sae", bare)
    assert code == 2 and f"{bare} does not name its model and hook (cfg.json metadata): pass --model and --hook" in err

    code, _, err = saewb_ioi(capsys, "--sae", bare, "--model", tiny_hf_folder, "--hook", HOOK)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{tiny_hf_folder}'s tokenizer has 0 of our {len(NAMES)} first names as single tokens" in err

    with pytest.raises(IOIError, match="has no hook 'blocks.9.hook_resid_post'"):
        run_ioi(model, sae_lib.load(bare), "blocks.9.hook_resid_post", n_prompts=24, n_names=6)
    with pytest.raises(IOIError, match="the SAE does not name its hook"):
        run_ioi(model, sae_lib.load(bare), n_prompts=24, n_names=6)
    assert run_ioi(model, sae_lib.load(narrow.parent / "sae"), n_prompts=24, n_names=6, n_latents=(1,)).hook == HOOK


def test_the_ioi_page_runs_the_evaluation_and_shows_the_table_and_figure(model, ioi_folder, tmp_path, monkeypatch):
    """The dashboard page runs run_ioi on the picked SAE and shows its numbers: the same as run_ioi's."""
    folder = make_sae(tmp_path / "sae", str(ioi_folder))
    sae_model = sae_lib.load(folder)

    class Store:
        def sae(self, name):
            return {"hook": HOOK, "model": str(ioi_folder), "path": str(folder)}

    monkeypatch.setattr(ioi_page, "get_store", Store)
    monkeypatch.setattr(ioi_page, "pick_sae", lambda store: "tiny")
    monkeypatch.setattr(ioi_page, "model_and_sae", lambda store, name: (model, sae_model, HOOK))
    at = page("ioi").run()
    assert not at.exception and not at.dataframe  # nothing runs before the button
    at.number_input[0].set_value(24)
    at.number_input[1].set_value(6)
    at.button(key="run_ioi").click().run()
    assert not at.exception and not at.error
    expected = run_ioi(model, sae_model, HOOK, n_prompts=24, n_names=6)
    table = at.dataframe[0].value
    assert list(table["method"]) == ["supervised", f"sae (≤ {max(N_LATENTS)} latents)"]
    assert table["necessity"].tolist() == pytest.approx([expected.necessity["supervised"], expected.necessity["sae"]])
    assert at.metric[1].value == f"{expected.accuracy:.1%}" and len(at.get("plotly_chart")) == 1
    assert set(at.dataframe[2].value["attribute"]) == set(ATTRIBUTES)


def test_the_ioi_page_refuses_an_hf_backend_hook(monkeypatch):
    class Store:
        def sae(self, name):
            return {"hook": "model.layers.1", "model": "m", "path": "p"}

    monkeypatch.setattr(ioi_page, "get_store", Store)
    monkeypatch.setattr(ioi_page, "pick_sae", lambda store: "hf-sae")
    at = page("ioi").run()
    assert not at.exception and "IOI reads transformer_lens hooks" in at.info[0].value


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_saewb_ioi_on_each_device_reports_what_the_cpu_reports(ioi_folder, tmp_path, capsys, device):
    """The model and the SAE on --device; the scores (host maths on the node's rows) match the CPU run's."""
    folder = make_sae(tmp_path / "sae", str(ioi_folder))
    runs = {}
    for where in ("cpu", device):
        code, out, err = saewb_ioi(capsys, "--sae", folder, "--prompts", 24, "--names", 6, "--n-latents", "1,2",
                                   "--device", where, "--json")
        assert code == 0, err
        runs[where] = json.loads(out)
    ours, ref = runs[device], runs["cpu"]
    assert ours["logit_diff_clean"] == pytest.approx(ref["logit_diff_clean"], rel=1e-4, abs=1e-5)
    assert ours["accuracy"] == ref["accuracy"] and ours["sae_l0"] == pytest.approx(ref["sae_l0"], abs=1e-6)
    for method in ("sae", "supervised"):
        for key in ("sufficiency", "necessity"):
            if ref[key][method] is None:
                assert ours[key][method] is None
            else:
                assert ours[key][method] == pytest.approx(ref[key][method], rel=1e-3, abs=1e-4), (key, method)
