"""sae.load("hf://ORG/REPO[/SUB][@REV]"): names parsed and checked, SAEs read from a Hugging Face cache laid out by
huggingface_hub's conventions, offline (no test reaches the network), and one clear error per problem."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors

import sae
from experiments.cli import main
from sae.errors import SAEConfigError, SAEDataError
from sae.hub import ROOT_PATTERNS, HubName, hub_name_of, parse_hub_name
from tests.conftest import COMMIT, folder_analyze_reads, put_in_cache, tiny_hub_sae

pytestmark = pytest.mark.usefixtures("one_thread")

OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory) -> Path:
    return tiny_hub_sae(tmp_path_factory.mktemp("sae") / "topk", HOOK)


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_sae(a: sae.SAE, b: sae.SAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.cfg == b.cfg and a.metadata == b.metadata


# ---------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(("text", "expected"), [
    ("hf://org/repo", HubName("org/repo")),
    ("hf://org/repo/sub@main", HubName("org/repo", "sub", "main")),
    ("hf://My-Org.x/sae_v2/layer_3/k32", HubName("My-Org.x/sae_v2", "layer_3/k32")),
    ("hf://org/repo@v1.0", HubName("org/repo", None, "v1.0")),
    ("hf://org/repo@refs/pr/1", HubName("org/repo", None, "refs/pr/1")),
    (f"hf://org/repo/sub@{COMMIT}", HubName("org/repo", "sub", COMMIT)),
])
def test_good_names_parse_and_print_back(text, expected):
    assert parse_hub_name(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(("text", "says"), [
    ("hf://", "names no repo"),
    ("hf://onlyorg", "names no repo"),
    ("hf://onlyorg/", "names no repo"),
    ("hf://a/b@", "revision"),
    ("hf://a/b@x y", "revision"),
    ("hf://a/b@x..y", ".."),
    ("hf://a b/c", "may hold only"),
    ("hf://a/b$c", "may hold only"),
    ("hf://-a/b", "must start with"),
    ("hf://a/b.", "not end with"),
    ("hf://a/b--c", "'--'"),
    ("hf://a/b.git", ".git"),
    ("hf://a/b//c", "empty part"),
    ("hf://a/b/", "empty part"),
    ("hf://a/b/../c", "subfolder part"),
    ("hf://a/b/sub dir", "subfolder part"),
    ("org/repo", "is not a hub name"),
])
def test_bad_names_are_one_line_errors(text, says):
    with pytest.raises(SAEConfigError) as info:
        parse_hub_name(text)
    message = str(info.value)
    assert says in message and "\n" not in message and repr(text) in message


def test_a_path_made_of_a_hub_name_still_counts_but_a_real_local_path_does_not(tmp_path, monkeypatch):
    assert hub_name_of("hf://org/repo/sub@main") == "hf://org/repo/sub@main"
    assert hub_name_of(Path("hf://org/repo/sub@main")) == "hf://org/repo/sub@main"  # Path reads it hf:/org/...
    assert hub_name_of("out/topk") is None and hub_name_of(Path("out/topk")) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf:" / "org" / "repo").mkdir(parents=True)
    assert hub_name_of(Path("hf://org/repo")) is None  # such a local folder exists: it is that folder


# --------------------------------------------------------------------------------------------- loading


def test_the_cache_layout_is_huggingface_hubs_own(hf_cache, sae_folder):
    put_in_cache(hf_cache, "org/repo", folder_files(sae_folder))
    info = huggingface_hub.scan_cache_dir(hf_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/repo" and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == {p.name for p in sae_folder.iterdir()}


def test_hub_names_load_the_same_sae_as_the_local_folder(hf_cache, sae_folder):
    local = sae.load(sae_folder)
    files = folder_files(sae_folder)
    put_in_cache(hf_cache, "org/repo", {**files, **folder_files(sae_folder, "sub/"), "README.md": b"# card\n"})
    for name in ("hf://org/repo", "hf://org/repo/sub@main", f"hf://org/repo/sub@{COMMIT}", "hf://org/repo@main"):
        assert_same_sae(sae.load(name), local)
    assert_same_sae(sae.load(Path("hf://org/repo/sub")), local)


def test_a_branch_resolves_through_its_ref(hf_cache, sae_folder):
    local = sae.load(sae_folder)
    put_in_cache(hf_cache, "org/repo", {"README.md": b"nothing at main\n"}, commit=COMMIT, refs=("main",))
    put_in_cache(hf_cache, "org/repo", folder_files(sae_folder), commit=OTHER_COMMIT, refs=("dev",))
    assert_same_sae(sae.load("hf://org/repo@dev"), local)
    with pytest.raises(SAEConfigError, match="cfg.json and sae_weights.safetensors are missing"):
        sae.load("hf://org/repo")


def test_an_uncached_name_offline_is_one_line_saying_how_to_get_it(hf_cache):
    with pytest.raises(SAEDataError) as info:
        sae.load("hf://org/missing/sub@v2")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("hf://org/missing/sub@v2 is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                              "(or no network): connect once, or download it with")
    assert "`hf download org/missing --revision v2 --include 'sub/*'`" in message


def test_an_uncached_revision_of_a_cached_repo_is_the_same_error(hf_cache, sae_folder):
    put_in_cache(hf_cache, "org/repo", folder_files(sae_folder))
    with pytest.raises(SAEDataError, match=r"hf://org/repo@v9 is not in the local Hugging Face cache"):
        sae.load("hf://org/repo@v9")


def test_a_snapshot_without_cfg_json_names_what_is_there(hf_cache, sae_folder):
    files = folder_files(sae_folder)
    put_in_cache(hf_cache, "org/repo", {"README.md": b"# card\n", "sae_weights.safetensors":
                                        files["sae_weights.safetensors"], **folder_files(sae_folder, "layer_3/")})
    with pytest.raises(SAEConfigError) as info:
        sae.load("hf://org/repo")
    message = str(info.value)
    assert "\n" not in message
    assert "hf://org/repo (the repo's root) is not an SAE folder: cfg.json is missing" in message
    assert "it holds README.md, layer_3/, sae_weights.safetensors" in message
    assert "SAE folders inside: hf://org/repo/layer_3" in message
    with pytest.raises(SAEConfigError, match=r"hf://org/repo/layer_4 is not an SAE folder: .* it holds nothing"):
        sae.load("hf://org/repo/layer_4")


def test_a_damaged_cached_sae_names_the_hub_name(hf_cache, sae_folder):
    files = folder_files(sae_folder)
    put_in_cache(hf_cache, "org/repo", {**files, "sae_weights.safetensors": b"not safetensors"})
    with pytest.raises(SAEConfigError, match=r"^hf://org/repo: .*not a readable safetensors file"):
        sae.load("hf://org/repo")


def test_snapshot_download_gets_the_repo_revision_and_only_the_folders_files(monkeypatch, sae_folder):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(sae_folder.parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sae.load(f"hf://org/repo/{sae_folder.name}@dev")
    with pytest.raises(SAEConfigError):  # the fake's root is no SAE folder; the call is what counts here
        sae.load("hf://org/repo")
    assert calls[0] == ("org/repo", {"revision": "dev", "allow_patterns": [f"{sae_folder.name}/*"],
                                     "library_name": "sae-workbench"})
    assert calls[1][1]["revision"] is None and calls[1][1]["allow_patterns"] == list(ROOT_PATTERNS)


def _hub_error(cls, message="server says no"):
    """An instance of a huggingface_hub HTTP error without an HTTP response (their __init__ wants one)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


@pytest.mark.parametrize(("raised", "error", "says"), [
    (hub_errors.RevisionNotFoundError, SAEConfigError, "revision 'v3' is not a branch, tag or commit of org/repo"),
    (hub_errors.RepositoryNotFoundError, SAEConfigError, "no model repo org/repo on the Hub"),
    (hub_errors.GatedRepoError, SAEConfigError, "is gated"),
    (hub_errors.HfHubHTTPError, SAEDataError, "the Hub answered server says no"),
])
def test_hub_errors_become_one_line(monkeypatch, raised, error, says):
    def fake_snapshot_download(repo_id, **kwargs):
        raise _hub_error(raised, "server says no\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(error) as info:
        sae.load("hf://org/repo@v3")
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_connection_failure_is_one_line(monkeypatch):
    class TransportError(Exception):  # the HTTP client's base class of connection errors, by name
        pass

    class ConnectError(TransportError):
        pass

    def fake_snapshot_download(repo_id, **kwargs):
        raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(SAEDataError, match=r"^hf://org/repo: cannot reach the Hub \(ConnectError: "):
        sae.load("hf://org/repo")


def test_analyze_reads_a_hub_name_from_its_cached_folder(hf_cache, sae_folder, monkeypatch):
    """analyze() resolves hf://ORG/REPO (also as the hf:/ a Path makes of it) to the cached snapshot folder, so the
    store row keeps a real path, the eval metrics and the training log; the default name is the repo's."""
    put_in_cache(hf_cache, "org/repo", folder_files(sae_folder))
    for name in ("hf://org/repo", Path("hf://org/repo")):
        folder = folder_analyze_reads(monkeypatch, name)
        assert folder.is_dir() and folder == sae.hub.download_sae_folder("hf://org/repo")
        assert_same_sae(sae.load(folder), sae.load(sae_folder))


def test_calibrate_refuses_a_hub_name_it_would_rewrite(capsys):
    assert main(["calibrate", "--sae", "hf://org/repo", "--activations", "cache"]) == 2
    err = capsys.readouterr().err
    assert err == ("saewb calibrate: error: --sae hf://org/repo is a hub name; calibrate rewrites a local folder in "
                   "place: download it (hf download ORG/REPO --local-dir DIR) and pass that folder.\n")
