"""Shared fixtures for the activations tests: a char-level tokenizer, tiny models and a small corpus.

Everything here is built locally and offline; heavy imports happen inside the fixtures so that
collecting other test modules stays cheap.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants

import sae
from activations.format import FORMAT_VERSION, MANIFEST
from activations.storage import atomic_write_bytes, atomic_write_json
from experiments.analysis import pipeline
from sae.synthetic import planted_dictionary_data

# No test ever reaches the Hugging Face hub; fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
# Printable ASCII without the vertical tab / form feed: 4 specials + 98 characters.
CHARS = [c for c in string.printable if c not in "\x0b\x0c"]
VOCAB = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = (VOCAB[t] for t in SPECIAL_TOKENS)

_WORDS = (
    "the a an of to in and or but light water stone river king city field house bread wind fire night day "
    "walked spoke carried found gave kept sought heard saw built opened closed went came stood fell rose "
    "old new small great quiet bright dark early late green golden"
).split()


def make_char_tokenizer():
    """One token per character: ``WordLevel`` over printable ASCII behind a split-every-character pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def corpus_paragraphs(n: int = 60, seed: int = 0) -> list[str]:
    """Deterministic short documents (40-250 characters) so that contexts of 32 tokens cross document bounds."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 45))]
        docs.append(f"{i}: " + " ".join(words).capitalize() + ".")
    return docs


@pytest.fixture(scope="session")
def char_tokenizer_dir(tmp_path_factory) -> Path:
    """The char tokenizer saved to a folder.

    transformer_lens re-creates a model's tokenizer from its ``name_or_path`` (to turn on
    ``add_bos_token``); an in-memory ``PreTrainedTokenizerFast`` has none, so models get the saved copy.
    """
    folder = tmp_path_factory.mktemp("char_tokenizer")
    make_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def char_tokenizer(char_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(char_tokenizer_dir)
    assert tokenizer.bos_token_id == BOS_ID and len(tokenizer) == len(VOCAB)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model(char_tokenizer):
    """A randomly initialised 3-layer HookedTransformer (d_model 32, 4 heads of 8, d_mlp 64), frozen, eval mode."""
    return make_tiny_model(char_tokenizer)


def make_tiny_model(char_tokenizer, n_ctx: int = 64):
    """The tiny_model fixture's HookedTransformer, with another context length if asked."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_ctx=n_ctx,
        d_vocab=len(VOCAB),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, char_tokenizer)
    model.eval()
    model.requires_grad_(False)
    assert model.tokenizer.bos_token_id == BOS_ID
    return model


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory, char_tokenizer) -> Path:
    """A 2-layer Llama (GQA: 4 query / 2 key-value heads) and the char tokenizer, saved as a local HF folder.

    Weights use a wide init (std 0.3) so the next-token distribution is far from uniform and a wrong
    conversion shows up in the log-probs.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(VOCAB),
        max_position_embeddings=128,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config).eval()
    # The folder name must not contain "llama"/"gemma": transformer_lens picks an architecture by substring.
    folder = tmp_path_factory.mktemp("tiny_hf_model")
    model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory) -> Path:
    """60 short paragraphs separated by blank lines (about 8k characters)."""
    path = tmp_path_factory.mktemp("corpus") / "paragraphs.txt"
    path.write_text("\n\n".join(corpus_paragraphs()) + "\n")
    return path


@pytest.fixture
def isolated_cache_root(tmp_path, monkeypatch) -> Path:
    """Point ``SAEWB_CACHE`` (converted models, extracted corpora) at a fresh folder for one test."""
    root = tmp_path / "saewb-cache-root"
    monkeypatch.setenv("SAEWB_CACHE", str(root))
    return root


@pytest.fixture
def datasets_tmp_cache(tmp_path, monkeypatch) -> Path:
    """Keep the arrow files that ``datasets.load_dataset`` writes for local corpus files out of ~/.cache."""
    import datasets

    folder = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensor ops are faster and repeatable on one thread; used by the SAE tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAKE_CACHE_HOOK = "blocks.0.hook_resid_post"


def write_cache(folder: Path, acts: torch.Tensor, shard_rows: int = 1024, hook: str = FAKE_CACHE_HOOK) -> Path:
    """A complete float32 activation cache laid out as activations/cache.py writes one (no model needed).

    Rows are split into shards of `shard_rows`; each shard stands for one context of shard_rows + 1
    tokens (a BOS, then one row per token), which is all the reader and the trainer look at.
    """
    rows = acts.to(torch.float32).numpy()
    shards, n_shards = [], -(-rows.shape[0] // shard_rows)
    for index in range(n_shards):
        data = np.ascontiguousarray(rows[index * shard_rows : (index + 1) * shard_rows]).tobytes()
        rel = f"{hook}/shard_{index:05d}.acts"
        atomic_write_bytes(folder / rel, data)
        shards.append(
            {
                "index": index,
                "contexts": [index, index + 1],
                "rows": min(shard_rows, rows.shape[0] - index * shard_rows),
                "files": {hook: {"acts": {"path": rel, "sha256": hashlib.sha256(data).hexdigest()}}},
            }
        )
    atomic_write_json(
        folder / MANIFEST,
        {
            "format_version": FORMAT_VERSION,
            "kind": "saewb-activation-cache",
            "model": "synthetic",
            "hooks": [hook],
            "corpus": "planted-dictionary",
            "context": shard_rows + 1,
            "seed": 0,
            "n_contexts": n_shards,
            "dtype": "float32",
            "with_grads": False,
            "d_in": {hook: rows.shape[1]},
            "bos_token_id": 0,
            "n_shards": n_shards,
            "shards": shards,
            "complete": True,
            "n_tokens": rows.shape[0],
        },
    )
    return folder


# ---- the analysis and dashboard tests' SAE, cache and page runner ----

D_IN, N_FEATURES, K, SHARD_ROWS, N_SHARDS = 32, 32, 4, 64, 3
"""The analysis tests' SAE and cache (make_sae, make_cache): widths, k, and 3 contexts of 64 rows."""


def make_sae(path, d_in: int = D_IN, arch: str = "topk", seed: int = 0, model_name: str = "synthetic"):
    """A randomly initialised (untrained) SAE is enough: the analysis only needs a fixed encode."""
    model = sae.get_architecture(arch)(sae.SAEConfig(arch=arch, d_in=d_in, n_features=N_FEATURES, k=K,
                                                     normalization="none"), seed=seed)
    model.metadata = {"hook_name": FAKE_CACHE_HOOK, "model_name": model_name}
    model.save(path)
    return model


def make_cache(path, seed: int = 0, d_in: int = D_IN):
    """3 contexts of 64 rows after a BOS; token ids 4..101 (the char tokenizer's characters)."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(SHARD_ROWS * N_SHARDS, d_in, generator=gen)
    write_cache(path, acts, shard_rows=SHARD_ROWS)
    tokens = np.random.default_rng(seed).integers(4, 102, size=(N_SHARDS, SHARD_ROWS + 1)).astype(np.int32)
    tokens[:, 0] = 0  # bos_token_id of write_cache's manifest
    np.save(path / "tokens.npy", tokens)
    return acts, tokens


def page(name: str):
    """An AppTest running one page's render() alone."""
    from streamlit.testing.v1 import AppTest

    def script(module: str) -> None:
        import importlib

        importlib.import_module(f"dashboard.views.{module}").render()

    return AppTest.from_function(script, args=(name,), default_timeout=30)


# ---- a Hugging Face cache laid out by huggingface_hub's conventions, offline (hub and pretrained-name tests) ----

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline: the environment and huggingface_hub's constants (read at import)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert hub_constants.is_offline_mode()  # every request huggingface_hub builds is refused before it is sent
    return cache


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT,
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay a repo snapshot out as huggingface_hub does (docs: "Understand caching"): models--ORG--NAME/ with
    blobs/<hash> (sha256 for LFS files such as safetensors, the git blob sha1 otherwise), refs/<ref> holding the
    commit hash, and snapshots/<commit>/<path> as relative symlinks to the blobs. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path_in_repo, content in files.items():
        if path_in_repo.endswith(".safetensors"):
            blob_id = hashlib.sha256(content).hexdigest()
        else:
            blob_id = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        blob = repo / "blobs" / blob_id
        blob.write_bytes(content)
        link = snapshot / path_in_repo
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot



def folder_analyze_reads(monkeypatch, name) -> Path:
    """The SAE folder `analyze(name, ...)` resolves `name` to (the analysis stops right before reading it)."""
    seen = {}

    class Stop(Exception):
        pass

    def load_inputs(sae_dir, activations_dir, hook):
        seen["dir"] = sae_dir
        raise Stop

    monkeypatch.setattr(pipeline, "_load_inputs", load_inputs)
    with pytest.raises(Stop):
        pipeline.analyze(name, "cache")
    return seen["dir"]


def tiny_hub_sae(folder: Path, hook: str = "blocks.1.hook_resid_post") -> Path:
    """A small trained TopK SAE saved at `folder` (the hub and push tests' SAE)."""
    acts = planted_dictionary_data(1024, 16, 32, 2, seed=4).acts
    model = sae.train(acts, arch="topk", n_features=32, k=2, batch_size=256, seed=3, progress=False,
                      norm_estimation_batches=4, geometric_median_rows=512)
    model.metadata.update(model_name="fake-model", hook_name=hook)
    return model.save(folder)


# ---- the import-graph tests' walker (test_imports, test_sae_imports, test_dashboard_imports): read with ast ----

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    """The dotted module name of a file of the repository (a package's __init__.py is the package)."""
    parts = path.resolve().relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: str) -> dict[str, Path]:
    """Every module of a first-party package: dotted name -> file."""
    return {module_name(p): p for p in sorted((REPO / package).rglob("*.py")) if "__pycache__" not in p.parts}


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, ast.AST]]:
    """Every module name an import anywhere in `tree` may load, with its node: `import a.b` gives a.b;
    `from a import b` gives a and a.b (b may be a submodule); relative imports are resolved against `module`;
    importlib.import_module / __import__ with a constant name count too."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up level - 1 packages from this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node))
            found += [(f"{base}.{alias.name}", node) for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "__import__"}:
                found.append((node.args[0].value, node))
    return found


def nested_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside a function, class body or lambda (an import there is not at the module's top)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            inside.update(id(inner) for inner in ast.walk(node) if inner is not node)
    return inside


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle as [a, b, ..., a], or None: depth-first search with white/grey/black marks (grey = on the path)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if colour.get(succ, white) == grey:
                return [*path[path.index(succ):], succ]
            if colour.get(succ, white) == white:
                colour.setdefault(succ, white)
                cycle = visit(succ)
                if cycle:
                    return cycle
        path.pop()
        colour[node] = black
        return None

    for start in sorted(graph):
        if colour[start] == white:
            cycle = visit(start)
            if cycle:
                return cycle
    return None
