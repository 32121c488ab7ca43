"""Corpora: embedded KJV, local files, seeded document order and BOS-separated packing into contexts."""

from __future__ import annotations

import ast
import json
import re
import sys

import numpy as np
import pytest
from conftest import BOS_ID, VOCAB, corpus_paragraphs

from activations.corpus import (
    CorpusError,
    _embedded,
    corpus_fingerprint,
    iter_texts,
    kjv_chapters,
    load_corpus,
    pack_tokens,
    stdlib_documents,
)

B = BOS_ID


def ids(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


# -- pack_tokens ------------------------------------------------------------------------------


def test_pack_tokens_bos_first_and_between_documents(char_tokenizer):
    out = pack_tokens(["abc", "defgh", "ij"], char_tokenizer, n_contexts=3, context=4, bos_id=B)
    expected = np.array([[B, *ids("abc")], [B, *ids("def")], [B, *ids("gh"), B]], dtype=np.int32)
    assert out.dtype == np.int32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, expected)


def test_pack_tokens_separator_inside_a_context(char_tokenizer):
    out = pack_tokens(["ab", "cd", "efghij"], char_tokenizer, n_contexts=2, context=6, bos_id=B)
    expected = np.array([[B, *ids("ab"), B, *ids("cd")], [B, *ids("efghi")]], dtype=np.int32)
    np.testing.assert_array_equal(out, expected)


def test_pack_tokens_skips_blank_documents_and_batches_do_not_matter(char_tokenizer):
    docs = corpus_paragraphs(40, seed=3)
    with_blanks = [d for doc in docs for d in (doc, "", "   \n")]
    one_batch = pack_tokens(docs, char_tokenizer, n_contexts=50, context=32, bos_id=B)
    small_batches = pack_tokens(with_blanks, char_tokenizer, n_contexts=50, context=32, bos_id=B, batch_docs=2)
    np.testing.assert_array_equal(one_batch, small_batches)
    # Reference: the documents joined by BOS, cut into contexts that each open with their own BOS
    # (a separator that would land right after a context's BOS is that BOS).
    stream = [tok for i, doc in enumerate(docs) for tok in ([B] if i else []) + ids(doc)]
    rows, current = [], [B]
    for tok in stream:
        if tok == B and len(current) == 1:
            continue
        current.append(tok)
        if len(current) == 32:
            rows.append(current)
            current = [B]
        if len(rows) == 50:
            break
    np.testing.assert_array_equal(one_batch, np.array(rows, dtype=np.int32))
    assert int((one_batch[:, 1:] == B).sum()) >= 5  # documents are short: separators occur inside contexts


def test_pack_tokens_fills_contexts_exactly(char_tokenizer):
    out = pack_tokens(corpus_paragraphs(60), char_tokenizer, n_contexts=64, context=32, bos_id=B)
    assert out.shape == (64, 32)
    assert (out[:, 0] == B).all()
    assert not (out == VOCAB["<pad>"]).any() and not (out == VOCAB["<unk>"]).any()
    # Row 0 starts with the first document of the list, character by character.
    assert out[0, 1:].tolist() == ids(corpus_paragraphs(60)[0][:31])


def test_pack_tokens_is_deterministic_per_seed(char_tokenizer):
    import datasets

    dataset = datasets.Dataset.from_dict({"text": corpus_paragraphs(60)})
    pack = lambda seed: pack_tokens(iter_texts(dataset, seed), char_tokenizer, n_contexts=40, context=32, bos_id=B)
    first, again, other = pack(0), pack(0), pack(1)
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.5
    # Each seed is a permutation of the same documents.
    order0, order1 = list(iter_texts(dataset, 0)), list(iter_texts(dataset, 1))
    assert sorted(order0) == sorted(order1) == sorted(corpus_paragraphs(60))
    assert order0 != order1 and order0 == list(iter_texts(dataset, 0))


def test_iter_texts_streaming_dataset_is_seeded():
    import datasets

    stream = datasets.Dataset.from_dict({"text": corpus_paragraphs(30)}).to_iterable_dataset(num_shards=3)
    first, again, other = list(iter_texts(stream, 5)), list(iter_texts(stream, 5)), list(iter_texts(stream, 6))
    assert sorted(first) == sorted(corpus_paragraphs(30))
    assert first == again and first != other


def test_pack_tokens_empty_corpus(char_tokenizer):
    with pytest.raises(CorpusError, match=r"^the corpus holds no text: every document is empty$"):
        pack_tokens(["", "   ", "\n\n"], char_tokenizer, n_contexts=2, context=8, bos_id=B)


def test_pack_tokens_runs_out(char_tokenizer):
    # "abc" + B + "defgh" + B + "ij" fills 3 contexts of 4 and 3 tokens of a 4th.
    with pytest.raises(CorpusError) as info:
        pack_tokens(["abc", "defgh", "ij"], char_tokenizer, n_contexts=4, context=4, bos_id=B)
    assert str(info.value) == (
        "the corpus ran out after 15 tokens, but 4 contexts of 4 tokens (16) were asked for: "
        "lower --tokens or use a larger corpus"
    )


def test_pack_tokens_context_too_short(char_tokenizer):
    with pytest.raises(CorpusError, match=r"context must be at least 2 tokens \(BOS plus one\); got 1"):
        pack_tokens(["abc"], char_tokenizer, n_contexts=1, context=1, bos_id=B)


# -- embedded corpora ---------------------------------------------------------------------------


def test_kjv_chapters():
    chapters = list(kjv_chapters())
    assert len(chapters) == 1189
    assert chapters[0].startswith("In the beginning God created the heaven")
    assert chapters[-1].endswith("Amen.")
    # Verse numbers are stripped: no chapter starts with a digit.
    assert not any(ch[:1].isdigit() for ch in chapters)


def test_stdlib_source_documents_hold_the_prose_documents_and_the_code(isolated_cache_root):
    prose = list(stdlib_documents("python-stdlib"))
    source = list(stdlib_documents("python-stdlib-source"))
    # One document per module either way (a module with < 200 characters of prose has no prose document).
    assert len(source) >= len(prose) > 300
    joined = "\n".join(source)
    assert sum(map(len, source)) > 3 * sum(map(len, prose))
    # Whole sources: code and the docstrings the prose corpus extracts from it.
    assert "def " in joined and "import " in joined
    first_docstring = ast.get_docstring(ast.parse(source[0]))
    assert first_docstring and first_docstring in "\n".join(prose)
    # Extracted once into the cache root, then read back unchanged.
    cached = sorted(p.name for p in (isolated_cache_root / "corpus").iterdir())
    assert cached == sorted(f"{kind}-{sys.version_info.major}.{sys.version_info.minor}.json"
                            for kind in ("python-stdlib", "python-stdlib-source"))
    assert list(stdlib_documents("python-stdlib-source")) == source


def test_default_large_is_kjv_and_whole_stdlib_sources(isolated_cache_root):
    large = list(_embedded("default-large"))
    chapters = list(kjv_chapters())
    source = list(stdlib_documents("python-stdlib-source"))
    assert sorted(large) == sorted(chapters + source)
    assert large[:2] == [chapters[0], source[0]]  # interleaved, like default
    assert sum(map(len, large)) > 2 * sum(map(len, _embedded("default")))
    assert corpus_fingerprint("default-large").startswith("default-large@python")


def test_load_corpus_kjv_is_a_dataset():
    ds = load_corpus("kjv")
    assert ds.column_names == ["text"] and len(ds) == 1189
    assert ds[0]["text"].startswith("In the beginning")


# -- local files ------------------------------------------------------------------------------


def test_load_corpus_txt_paragraphs(tmp_path, datasets_tmp_cache):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\nstill the first.\n\nSecond one.\n\nThird and last.")
    ds = load_corpus(str(path))
    assert ds.column_names == ["text"]
    assert ds["text"][:] == ["First paragraph,\nstill the first.", "Second one.", "Third and last."]


def test_load_corpus_jsonl(tmp_path, datasets_tmp_cache):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"document number {i}"}) + "\n" for i in range(5)))
    ds = load_corpus(str(path))
    assert len(ds) == 5 and ds["text"][:] == [f"document number {i}" for i in range(5)]
    assert ds["id"][:] == [0, 1, 2, 3, 4]


def test_load_corpus_jsonl_other_column(tmp_path, datasets_tmp_cache):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"b{i}", "id": i}) + "\n" for i in range(3)))
    ds = load_corpus(str(path), text_column="body")
    assert ds["text"][:] == ["b0", "b1", "b2"]


def test_load_corpus_parquet(tmp_path, datasets_tmp_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma", "delta"], "n": [1, 2, 3, 4]}), path)
    ds = load_corpus(str(path))
    assert len(ds) == 4 and ds["text"][:] == ["alpha", "beta", "gamma", "delta"]


def test_load_corpus_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError) as info:
        load_corpus(str(missing))
    assert str(info.value) == f"corpus file {str(missing)!r} does not exist"


def test_load_corpus_bad_suffix(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CorpusError) as info:
        load_corpus(str(path))
    assert str(info.value) == (
        f"corpus file {str(path)!r} has suffix '.csv'; allowed: ['.json', '.jsonl', '.parquet', '.txt']"
    )


def test_load_corpus_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(CorpusError) as info:
        load_corpus(str(path))
    assert str(info.value) == f"corpus file {str(path)!r} is empty: it holds no text to tokenise"


def test_load_corpus_jsonl_without_text_column(tmp_path, datasets_tmp_cache):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"b{i}", "id": i}) + "\n" for i in range(3)))
    with pytest.raises(CorpusError) as info:
        load_corpus(str(path))
    assert str(info.value) == f"corpus file {str(path)!r} has columns ['body', 'id']; expected a 'text' column"


def test_load_corpus_malformed_jsonl(tmp_path, datasets_tmp_cache):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": unquoted}\n')
    with pytest.raises(CorpusError, match=r"^corpus file .*broken\.jsonl', line 2: not valid JSON"):
        load_corpus(str(path))


def test_load_corpus_folder(tmp_path):
    with pytest.raises(CorpusError) as info:
        load_corpus(str(tmp_path))
    assert str(info.value) == f"corpus {str(tmp_path)!r} is a folder; give a .txt, .jsonl or .parquet file"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "fine"}\n\n{"text": "cut', "bad.jsonl', line 3: not valid JSON"),
        ("list.jsonl", b'{"text": "fine"}\n[1, 2]\n', "list.jsonl', line 2: a JSON list, not an object"),
        ("bin.txt", b"some text\n\x00\x01\x02", "is binary, not text: a NUL byte at byte offset 10"),
        ("latin.txt", "caf\xe9 au lait".encode("latin-1"), "is not UTF-8 text: byte offset 3"),
    ],
)
def test_damaged_local_corpora_name_the_file_and_the_place(tmp_path, datasets_tmp_cache, name, content, message):
    """Bug fixed: datasets only said "An error occurred while generating the dataset"."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=re.escape(message)):
        load_corpus(str(path))
