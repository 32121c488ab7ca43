"""Every dashboard page under streamlit's AppTest, on a tiny store built here (never the demo's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dashboard import figures
from dashboard.data import device_name, store_path
from dashboard.launch import dashboard_command
from experiments.analysis.pipeline import analyze
from experiments.analysis.store import STORE_SCHEMA_VERSION, AnalysisStore, StoreError
from sae.errors import SAEConfigError
from tests.conftest import make_cache, make_sae, page

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("dash")
    make_cache(root / "cache")
    for name, seed in (("alpha", 0), ("beta", 1)):
        make_sae(root / name, seed=seed)
        (root / name / "eval.json").write_text(json.dumps({"l0": 4.0 + seed, "fvu": 0.3 - 0.1 * seed}))
        (root / name / "train_log.jsonl").write_text(json.dumps({"step": 5, "dead_frac": 0.1 * seed, "l0": 4.0}))
        analyze(root / name, root / "cache", model=tiny_model if name == "alpha" else None, out=root / "store",
                top_n=4, window=2, progress=False)
    return root / "store"


@pytest.fixture
def app_env(store_dir, monkeypatch):
    monkeypatch.setenv("SAEWB_STORE", str(store_dir))
    return store_dir


def test_app_opens_on_overview(app_env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "Overview"
    assert not at.error


def test_every_page_renders_through_the_apps_navigation(tmp_path, monkeypatch):
    """st.navigation runs each page from its file under dashboard/views/, as the served app does."""
    from streamlit.testing.v1 import AppTest

    from dashboard.navigation import PAGE_TABLE

    monkeypatch.setenv("SAEWB_STORE", str(tmp_path / "none"))
    at = AppTest.from_file(APP, default_timeout=30).run()
    for url, (file, title) in PAGE_TABLE.items():
        at.switch_page(f"views/{file}").run()
        assert not at.exception, url
        assert at.title[0].value == title, url
        assert "saewb analyze --sae" in at.error[0].value, url


def test_overview_lists_saes_and_plots(app_env):
    at = page("overview").run()
    assert not at.exception
    assert at.title[0].value == "Overview"
    table = at.dataframe[0].value
    assert list(table["name"]) == ["alpha", "beta"] and list(table["arch"]) == ["topk", "topk"]
    assert list(table["FVU"]) == pytest.approx([0.3, 0.2])
    assert "CE recovered" in at.info[0].value  # no SAE here has it
    fig = figures.tradeoff(AnalysisStore(app_env).saes(), "fvu", "FVU")
    assert list(fig.data[0].x) == [4.0, 5.0] and list(fig.data[0].text) == ["alpha", "beta"]


def test_overview_names_each_numbers_rule_and_shows_g_sae_both_ways(tmp_path, monkeypatch):
    """A g-SAE's eval.json holds its gradient-rule numbers and, under plain_topk, the same dictionary scored
    without gradients: the overview must show both and say which rule each used."""
    make_cache(tmp_path / "cache")
    make_sae(tmp_path / "g", arch="gradient_topk")
    (tmp_path / "g" / "eval.json").write_text(json.dumps({
        "l0": 4.0, "fvu": 0.25, "selection_rule": "gradient selection",
        "plain_topk": {"fvu": 0.31, "ce_loss_recovered": 0.8, "selection_rule": "plain TopK at inference"},
    }))
    analyze(tmp_path / "g", tmp_path / "cache", model=None, out=tmp_path / "store", top_n=4, window=2,
            progress=False)
    monkeypatch.setenv("SAEWB_STORE", str(tmp_path / "store"))
    at = page("overview").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["rule"]) == ["gradient selection"]
    assert list(table["FVU"]) == [0.25] and list(table["FVU, plain TopK"]) == [0.31]
    assert list(table["CE recovered, plain TopK"]) == [0.8]
    assert any("gradient rule" in c.value for c in at.caption)


def test_feature_browser_card_changes_with_id(app_env):
    store = AnalysisStore(app_env)
    at = page("features").run()
    assert not at.exception
    assert at.subheader[0].value == "alpha · feature 0"
    want0 = store.feature("alpha", 0)
    assert at.metric[0].value == f"{want0['density']:.3%}"
    at.number_input(key="feature_id").set_value(7).run()
    want7 = store.feature("alpha", 7)
    assert at.subheader[0].value == "alpha · feature 7"
    assert at.metric[2].value == f"{want7['max_act']:.3f}"
    html = "".join(h.proto.body for h in at.get("html"))
    assert f"({want7['top_contexts'][0]['value']:.3f})" in html
    tokens = [row for row in at.dataframe[0].value["token"]]
    assert tokens == [t for t, _ in want7["logit_top"]]


def test_feature_browser_out_of_range_and_search(app_env):
    at = page("features").run()
    at.number_input(key="feature_id").set_value(32).run()
    assert not at.exception
    assert "feature 32 is out of range: alpha has features 0..31" in at.error[0].value
    at.number_input(key="feature_id").set_value(-1).run()
    assert "out of range" in at.error[0].value
    card = AnalysisStore(app_env).feature("alpha", 3)
    token = card["top_contexts"][0]["tokens"][card["top_contexts"][0]["centre"]]
    at.radio(key="pick_how").set_value("by token search").run()
    at.text_input(key="feature_query").set_value(token).run()
    assert not at.exception
    hits = at.selectbox(key="hit")
    assert any(label.startswith("3: ") for label in hits.options)
    hits.set_value(3).run()
    assert at.subheader[0].value == "alpha · feature 3"
    at.text_input(key="feature_query").set_value("zzz-nothing").run()
    assert "No feature of alpha" in at.warning[0].value


def test_feature_browser_switches_sae(app_env):
    at = page("features").run()
    at.sidebar.selectbox(key="sae").set_value("beta").run()
    assert at.subheader[0].value == "beta · feature 0"
    assert "No logit lens" in at.info[0].value  # beta was analysed without a model


def test_dead_features_page(app_env):
    store = AnalysisStore(app_env)
    at = page("dead_features").run()
    assert not at.exception
    assert at.title[0].value == "Dead features"
    dead = {name: (store.densities(name) == 0).mean() for name in ("alpha", "beta")}
    assert [m.value for m in at.metric][::2] == [f"{dead['alpha']:.1%}", f"{dead['beta']:.1%}"]
    assert len(at.get("plotly_chart")) == 2  # densities and dead fraction over training
    at.selectbox(key="dead_sae").set_value("beta").run()
    assert not at.exception
    dead_beta = store.dead_features("beta")
    if dead_beta:
        assert at.dataframe[0].value["feature"].tolist() == dead_beta
    else:
        assert at.success[0].value == "beta has no dead features on the analysed rows."


def test_missing_store_is_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEWB_STORE", str(tmp_path / "none"))
    for name in ("overview", "features", "dead_features", "inspector", "steering", "ioi"):
        at = page(name).run()
        assert not at.exception
        assert "saewb analyze --sae" in at.error[0].value


def test_store_path_and_launch_command(monkeypatch):
    monkeypatch.setenv("SAEWB_STORE", "/env/store")
    assert store_path(["--store", "/arg/store"]) == "/arg/store"
    assert store_path(["-q"]) == "/env/store"
    cmd = dashboard_command("/s", 8600, "127.0.0.1")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[-4:] == ["--store", "/s", "--device", "auto"]
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert dashboard_command("/s", 8600, "127.0.0.1", "cpu")[-2:] == ["--device", "cpu"]


def test_the_dashboard_device_comes_from_the_command_line_then_the_environment(monkeypatch):
    monkeypatch.delenv("SAEWB_DEVICE", raising=False)
    assert device_name([]) == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    monkeypatch.setenv("SAEWB_DEVICE", "cpu")
    assert device_name(["--store", "/s"]) == "cpu"
    with pytest.raises(SAEConfigError, match="device must be auto .* got 'gpu'"):
        device_name(["--device", "gpu"])


def test_log_density_figure_skips_dead():
    fig = figures.log_density_histograms({"a": torch.tensor([0.0, 0.01, 0.1]).numpy()})
    assert list(fig.data[0].x) == pytest.approx([-2.0, -1.0])


# ---- pages that need the model: a tiny Llama folder stands in for the store's model ------------------------


@pytest.fixture(scope="module")
def live_store(tmp_path_factory, tiny_hf_folder):
    """`live` fits the tiny model's blocks.0.hook_resid_post (width 32); `narrow` (d_in 16) does not."""
    root = tmp_path_factory.mktemp("live")
    make_cache(root / "cache")
    make_cache(root / "cache16", d_in=16)
    make_sae(root / "live", model_name=str(tiny_hf_folder))
    make_sae(root / "narrow", d_in=16, model_name=str(tiny_hf_folder))
    analyze(root / "live", root / "cache", out=root / "store", top_n=3, window=2, progress=False)
    analyze(root / "narrow", root / "cache16", out=root / "store", top_n=3, window=2, progress=False)
    return root / "store"


@pytest.fixture
def live_env(live_store, monkeypatch):
    monkeypatch.setenv("SAEWB_STORE", str(live_store))
    return live_store


@pytest.fixture(scope="module")
def hf_model(tiny_hf_folder):
    from activations.models import load_model

    return load_model(str(tiny_hf_folder))


def test_features_on_text_matches_a_direct_encode(live_store, hf_model):
    import sae
    from dashboard.lm import InputError, features_on_text

    model_sae = sae.load(AnalysisStore(live_store).sae("live")["path"])
    tokens, z = features_on_text(hf_model, model_sae, "blocks.0.hook_resid_post", "stone river")
    assert tokens == list("stone river")
    _, cache = hf_model.run_with_cache(torch.tensor([[2, *[hf_model.tokenizer.convert_tokens_to_ids(c)
                                                            for c in "stone river"]]]))
    assert torch.allclose(z, model_sae.encode(cache["blocks.0.hook_resid_post"][0])[1:], atol=1e-5)
    with pytest.raises(InputError, match="empty"):
        features_on_text(hf_model, model_sae, "blocks.0.hook_resid_post", "   ")


def test_prompt_inspector_page(live_env):
    at = page("inspector").run()
    assert not at.exception
    assert at.title[0].value == "Prompt inspector"
    first = at.dataframe[0].value
    assert len(first) == len("The quick brown fox jumps over the lazy dog.")
    at.text_area(key="inspect_text").set_value("dark night").run()
    table = at.dataframe[0].value
    assert list(table["token"]) == list("dark night")
    assert at.selectbox(key="inspect_pick").options  # the features active on this text
    at.text_area(key="inspect_text").set_value("  ").run()
    assert "the text is empty" in at.error[0].value
    at.sidebar.selectbox(key="sae").set_value("narrow").run()
    at.text_area(key="inspect_text").set_value("dark").run()
    assert not at.exception
    assert "the SAE has d_in=16 but the model's blocks.0.hook_resid_post has width 32" in at.error[0].value


def test_steering_api(live_store, hf_model):
    import sae
    from experiments import steering

    model_sae = sae.load(AnalysisStore(live_store).sae("live")["path"])
    hook = "blocks.0.hook_resid_post"
    args = dict(prompt="the old king", max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    zero = steering.steer_generate(hf_model, model_sae, hook, [0, 5], [[0.0, 0.0], [40.0, 0.0]], **args)
    assert zero.steered[0] == zero.baseline and len(zero.baseline) > 0
    ticks = []
    alone = steering.steer_generate(hf_model, model_sae, hook, [0], [[40.0]], **args,
                                    on_token=lambda i, n: ticks.append((i, n)))
    assert ticks[0] == (0, 6) and [i for i, _ in ticks] == list(range(len(ticks))) and len(ticks) <= 6
    assert alone.baseline == zero.baseline  # the same seed gives the same baseline
    assert alone.steered[0] == zero.steered[1]  # and a row's result does not depend on its batch neighbours
    strong = steering.steer_generate(hf_model, model_sae, hook, [0], [[40.0]], **{**args, "temperature": 0.0})
    assert strong.steered[0] != strong.baseline
    directions = steering.feature_directions(model_sae, [0, 5])
    assert torch.allclose(directions, model_sae.W_dec[[0, 5]].detach(), atol=1e-6)  # normalization "none"
    rows = torch.tensor([[float("nan")], [2.0]])  # row 0 untouched, row 1 steered by 2
    hook_fn = steering.steering_hook(model_sae, [0], rows, directions[:1], "add",
                                     lambda n: (torch.arange(n) == 1).float())
    x = torch.zeros(2, 3, 32)
    delta = hook_fn(x, None) - x
    assert torch.allclose(delta[1, 1], 2 * directions[0])
    assert delta[1, [0, 2]].abs().max() == 0 and delta[0].abs().max() == 0
    ablate = steering.steering_hook(model_sae, [0], torch.tensor([[5.0]]), directions[:1], "ablate",
                                    lambda n: torch.ones(n))
    acts = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0)) * 3
    z_before = model_sae.encode(acts)[..., 0]
    z_after = model_sae.encode(ablate(acts, None))[..., 0]
    assert z_before.max() > 0 and z_after.max() < z_before.max()


def test_coefficient_validation():
    from dashboard.views.steering import SteeringError, parse_coefficients, parse_features

    assert parse_coefficients("2", 2, "raw", [1.0, 1.0]) == [2.0, 2.0]
    assert parse_coefficients("2, -1", 2, "× max activation", [3.0, 4.0]) == [6.0, -4.0]
    for text, message in [("abc", "not a number"), ("nan", "not finite"), ("inf", "not finite"),
                          ("1e9", "too large"), ("1, 2, 3", "one coefficient per feature")]:
        with pytest.raises(SteeringError, match=message):
            parse_coefficients(text, 2, "raw", [1.0, 1.0])
    with pytest.raises(SteeringError, match="too large: keep"):
        parse_coefficients("101", 1, "× max activation", [1.0])
    assert parse_features("3, 7", 32) == [3, 7]
    with pytest.raises(SteeringError, match="out of range"):
        parse_features("32", 32)
    with pytest.raises(SteeringError, match="not an integer"):
        parse_features("x", 32)


def test_steering_page(live_env):
    at = page("steering").run()
    assert not at.exception
    assert at.title[0].value == "Steering"
    assert not at.get("code")  # nothing generated before the button
    at.number_input(key="steer_new").set_value(4)
    at.text_input(key="steer_coefs").set_value("40")
    at.text_input(key="steer_sweep").set_value("0, 40")
    at.button(key="steer_go").click().run()
    assert not at.exception and not at.error
    codes = [c.value for c in at.get("code")]
    assert len(codes) == 2 and all(c.startswith("The weather today is") for c in codes)
    sweep = at.dataframe[0].value
    assert list(sweep["coefficient"]) == [0.0, 40.0]
    assert codes[0] == "The weather today is" + sweep["steered"][0]  # coefficient 0 is the baseline
    assert list(sweep["kl"])[0] == 0.0 and list(sweep["kl"])[1] > 0  # scored: coefficient 0 costs nothing
    assert list(sweep["effect"])[0] == 0.0 and list(sweep["delta_ce"])[0] == 0.0
    assert len(at.get("plotly_chart")) == 1
    for coefs, message in [("abc", "not a number"), ("5000", "too large"), ("nan", "not finite")]:
        at.text_input(key="steer_coefs").set_value(coefs)
        at.button(key="steer_go").click().run()
        assert message in at.error[0].value
    at.text_input(key="steer_coefs").set_value("1")
    at.text_input(key="steer_features").set_value("99")
    at.button(key="steer_go").click().run()
    assert "feature 99 is out of range" in at.error[0].value
    at.text_input(key="steer_features").set_value("0")
    at.text_area(key="steer_prompt").set_value("")
    at.button(key="steer_go").click().run()
    assert "the text is empty" in at.error[0].value
    at.text_area(key="steer_prompt").set_value("dark")
    at.sidebar.selectbox(key="sae").set_value("narrow").run()
    at.button(key="steer_go").click().run()
    assert "the SAE has d_in=16 but the model's blocks.0.hook_resid_post has width 32" in at.error[0].value


def test_steering_page_unlearns_a_concept(live_env):
    """The unlearning section: forgetting against cost per clamp size, as `saewb unlearn`; zero features cost
    nothing."""
    at = page("steering").run()
    at.text_input(key="unlearn_concept").set_value("the quick brown fox")
    at.text_input(key="unlearn_sizes").set_value("0,2")
    at.number_input(key="unlearn_tokens").set_value(3)
    at.button(key="unlearn_go").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["n_features"]) == [0, 2]
    assert list(table["kl"])[0] == 0.0 and list(table["forgetting"])[0] == 0.0 and list(table["kl"])[1] > 0
    assert len(at.get("plotly_chart")) == 1
    at.text_input(key="unlearn_sizes").set_value("1,x")
    at.button(key="unlearn_go").click().run()
    assert "clamp sizes must be comma-separated integers" in at.error[0].value
    at.text_input(key="unlearn_sizes").set_value("1")
    at.text_input(key="unlearn_concept").set_value("")
    at.button(key="unlearn_go").click().run()
    assert "the text is empty" in at.error[0].value


def test_prompt_inspector_clicks_through_to_the_feature_browser(live_env):
    from streamlit.testing.v1 import AppTest

    def two_pages() -> None:
        import streamlit as st

        from dashboard.navigation import pages

        found = pages()
        st.navigation([found["inspect"], found["features"]]).run()

    at = AppTest.from_function(two_pages, default_timeout=30).run()
    assert at.title[0].value == "Prompt inspector"
    pick = at.selectbox(key="inspect_pick")
    chosen = pick.options[1]
    pick.set_value(int(chosen.split(" ")[0])).run()
    assert at.subheader[0].value == f"live · feature {chosen.split(' ')[0]}"  # the card shows inline
    at.button(key="inspect_open").click().run()
    assert not at.exception
    assert at.title[0].value == "Feature browser"
    assert at.number_input(key="feature_id").value == int(chosen.split(" ")[0])


def test_feature_browser_picks_from_text(live_env, hf_model):
    import sae
    from dashboard.lm import features_on_text

    at = page("features").run()
    at.sidebar.selectbox(key="sae").set_value("live").run()
    at.radio(key="pick_how").set_value("active on a text").run()
    assert "Type a text" in at.info[0].value
    at.text_input(key="feature_text").set_value("old stone").run()
    assert not at.exception
    _, z = features_on_text(hf_model, sae.load(AnalysisStore(live_env).sae("live")["path"]),
                            "blocks.0.hook_resid_post", "old stone")
    strongest = int(z.max(0).values.argmax())
    hits = at.selectbox(key="text_hit")
    assert hits.value == strongest
    assert at.subheader[0].value == f"live · feature {strongest}"


def test_a_replaced_store_is_reread(tmp_path, monkeypatch, store_dir):
    import os
    import shutil

    monkeypatch.setenv("SAEWB_STORE", str(tmp_path))
    at = page("overview").run()
    assert "no analysis store" in at.error[0].value
    shutil.copy(store_dir / "store.sqlite", tmp_path / "store.sqlite")
    os.utime(tmp_path / "store.sqlite", (1, 1))
    at.run()
    assert not at.error and list(at.dataframe[0].value["name"]) == ["alpha", "beta"]


def _damaged_store(folder: Path, kind: str) -> Path:
    import sqlite3

    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "store.sqlite"
    if kind == "garbage":
        file.write_bytes(b"this is not a database at all" * 100)
    elif kind == "empty":
        file.write_bytes(b"")
    else:  # a store from a newer schema
        with sqlite3.connect(file) as con:
            con.execute("CREATE TABLE saes (id INTEGER)")
            con.execute("PRAGMA user_version = 99")
    return folder


DAMAGE = [("garbage", "is not a readable analysis store"), ("empty", "is empty or not an analysis store"),
          ("newer", "was written by a newer sae-workbench (store schema 99")]


@pytest.mark.parametrize(("kind", "message"), DAMAGE)
def test_a_damaged_store_is_one_message_on_every_page(tmp_path, monkeypatch, kind, message):
    """Bug fixed: a corrupt or empty store.sqlite showed an uncaught DatabaseError / 'no such table' in every page."""
    monkeypatch.setenv("SAEWB_STORE", str(_damaged_store(tmp_path / "store", kind)))
    for name in ("overview", "features", "dead_features", "inspector", "steering", "ioi"):
        at = page(name).run()
        assert not at.exception, name
        assert message in at.error[0].value and "saewb analyze" in at.error[0].value, name


@pytest.mark.parametrize(("kind", "message"), DAMAGE)
def test_saewb_dashboard_refuses_a_damaged_store_before_serving(tmp_path, capsys, monkeypatch, kind, message):
    import dashboard.launch
    from experiments.cli import main

    monkeypatch.setattr(dashboard.launch, "serve", lambda *a, **k: pytest.fail("the server must not start"))
    code = main(["dashboard", "--store", str(_damaged_store(tmp_path / "store", kind))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_analyze_refuses_to_overwrite_a_damaged_store(built_store_inputs, tmp_path):
    sae_dir, cache = built_store_inputs
    folder = _damaged_store(tmp_path / "store", "garbage")
    before = (folder / "store.sqlite").read_bytes()
    with pytest.raises(StoreError, match="is not a readable analysis store"):
        analyze(sae_dir, cache, out=folder, top_n=4, window=2, progress=False)
    assert (folder / "store.sqlite").read_bytes() == before


def test_a_new_store_records_its_schema_version(built_store_inputs, tmp_path):
    import sqlite3

    sae_dir, cache = built_store_inputs
    analyze(sae_dir, cache, out=tmp_path / "s", top_n=4, window=2, progress=False)
    with sqlite3.connect(tmp_path / "s" / "store.sqlite") as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == STORE_SCHEMA_VERSION == 1


@pytest.fixture
def built_store_inputs(tmp_path):
    make_cache(tmp_path / "cache")
    make_sae(tmp_path / "sae")
    return tmp_path / "sae", tmp_path / "cache"
