"""The dashboard's data: one SQLite file per store folder (schema, atomic writer, read-only reader).

SQLite because it is in the standard library, needs no server, answers an indexed ``(sae, feature)`` lookup in
about a millisecond, keeps several SAEs side by side in one file and lets many readers (Streamlit sessions) open
it at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from activations.storage import default_file_mode

STORE_FILE = "store.sqlite"


DEFAULT_STORE = "runs/demo/store"


STORE_SCHEMA_VERSION = 1
"""Written as PRAGMA user_version; a store from a newer schema is refused (stores from before it read 0)."""


STORE_TABLES = ("saes", "features", "training_log")


SCHEMA = """
CREATE TABLE IF NOT EXISTS saes (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, path TEXT, arch TEXT, n_features INTEGER, k INTEGER,
    d_in INTEGER, hook TEXT, model TEXT, n_rows INTEGER, metrics TEXT, hist_edges TEXT
);
CREATE TABLE IF NOT EXISTS features (
    sae_id INTEGER NOT NULL, feature INTEGER NOT NULL, density REAL, mean_act REAL, max_act REAL,
    histogram TEXT, top_contexts TEXT, quantile_samples TEXT, logit_top TEXT, logit_bottom TEXT,
    neighbours TEXT, top_tokens TEXT, PRIMARY KEY (sae_id, feature)
);
CREATE TABLE IF NOT EXISTS training_log (sae_id INTEGER NOT NULL, step INTEGER, dead_frac REAL, l0 REAL, fvu REAL);
CREATE TABLE IF NOT EXISTS head_attribution (sae_id INTEGER NOT NULL, feature INTEGER NOT NULL, shares TEXT,
    PRIMARY KEY (sae_id, feature));
CREATE INDEX IF NOT EXISTS training_log_sae ON training_log (sae_id, step);
"""


def write_sae(out: Path, summary: dict[str, Any], feature_rows: list[tuple], log: list[tuple],
              head_rows: list[tuple] | None = None) -> Path:
    """Add or replace one SAE in the store, atomically: edit a copy, then os.replace it over the original."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / STORE_FILE
    fd, tmp_name = tempfile.mkstemp(prefix=".store-", suffix=".sqlite", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if target.exists():
            AnalysisStore(target).con.close()  # a damaged or newer store is refused, never overwritten
            with sqlite3.connect(target) as src, sqlite3.connect(tmp) as dst:
                src.backup(dst)
        con = sqlite3.connect(tmp)
        with con:
            con.executescript(SCHEMA)
            con.execute(f"PRAGMA user_version = {STORE_SCHEMA_VERSION}")
            old = con.execute("SELECT id FROM saes WHERE name = ?", (summary["name"],)).fetchone()
            if old:
                tables = (("features", "sae_id"), ("training_log", "sae_id"), ("head_attribution", "sae_id"),
                          ("saes", "id"))
                for table, column in tables:
                    con.execute(f"DELETE FROM {table} WHERE {column} = ?", (old[0],))
            columns = ", ".join(summary)
            cur = con.execute(f"INSERT INTO saes ({columns}) VALUES ({', '.join('?' * len(summary))})",
                              tuple(summary.values()))
            sae_id = cur.lastrowid
            con.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(sae_id, *row) for row in feature_rows])
            con.executemany("INSERT INTO training_log VALUES (?, ?, ?, ?, ?)", [(sae_id, *row) for row in log])
            con.executemany("INSERT INTO head_attribution VALUES (?, ?, ?)",
                            [(sae_id, *row) for row in head_rows or []])
        con.close()
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide the store from another user's dashboard
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class StoreError(ValueError):
    """No store at the given path, or an SAE / feature that is not in it."""


class AnalysisStore:
    """Read-only access to a store folder (or its store.sqlite); safe to share across Streamlit sessions."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / STORE_FILE if path.is_dir() or path.suffix != ".sqlite" else path
        if not self.path.exists():
            raise StoreError(
                f"no analysis store at {path}: build one with `saewb analyze --sae RUN --activations CACHE "
                f"--out {path if path.suffix != '.sqlite' else path.parent}` (or `make demo`)"
            )
        self.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self.con.row_factory = sqlite3.Row
        self._check()

    def _check(self) -> None:
        """A damaged file, an empty one, or a store of a newer schema: one StoreError with the way to rebuild."""
        rebuild = (f"delete it and rebuild it with `saewb analyze --sae RUN --activations CACHE "
                   f"--out {self.path.parent}`")
        try:
            version = int(self.con.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable analysis store ({exc}); {rebuild}") from None
        if version > STORE_SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer sae-workbench (store schema {version}; this one "
                             f"reads up to {STORE_SCHEMA_VERSION}): upgrade sae-workbench, or {rebuild}")
        missing = [t for t in STORE_TABLES if t not in tables]
        if missing:
            raise StoreError(
                f"{self.path} is empty or not an analysis store (no table {', '.join(missing)}); {rebuild}"
            )

    def saes(self) -> list[dict[str, Any]]:
        rows = self.con.execute("SELECT * FROM saes ORDER BY name").fetchall()
        return [{**dict(r), "metrics": json.loads(r["metrics"]), "hist_edges": json.loads(r["hist_edges"])}
                for r in rows]

    def sae(self, name: str) -> dict[str, Any]:
        for info in self.saes():
            if info["name"] == name:
                return info
        raise StoreError(f"SAE {name!r} is not in the store; it holds {[s['name'] for s in self.saes()]}")

    def _id(self, name: str) -> int:
        row = self.con.execute("SELECT id FROM saes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"SAE {name!r} is not in the store")
        return int(row[0])

    def head_shares(self, name: str, idx: int) -> list[float] | None:
        """Feature `idx`'s share per attention head (hook_z SAEs analysed with a model), else None."""
        tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "head_attribution" not in tables:  # a store from before head attribution
            return None
        row = self.con.execute("SELECT shares FROM head_attribution WHERE sae_id = ? AND feature = ?",
                               (self._id(name), int(idx))).fetchone()
        return None if row is None else json.loads(row[0])

    def feature(self, name: str, idx: int) -> dict[str, Any]:
        """One feature's card; a StoreError names the valid range when `idx` is outside it."""
        sae_id = self._id(name)
        row = self.con.execute("SELECT * FROM features WHERE sae_id = ? AND feature = ?", (sae_id, int(idx))).fetchone()
        if row is None:
            n = self.con.execute("SELECT n_features FROM saes WHERE id = ?", (sae_id,)).fetchone()[0]
            raise StoreError(f"feature {idx} is out of range: {name} has features 0..{n - 1}")
        out = dict(row)
        for key in ("histogram", "top_contexts", "quantile_samples", "logit_top", "logit_bottom", "neighbours"):
            out[key] = json.loads(out[key])
        return out

    def search(self, name: str, text: str, limit: int = 50) -> list[tuple[int, str]]:
        """Features whose top tokens or logit-lens tokens contain `text` (case-insensitive), densest first."""
        rows = self.con.execute(
            "SELECT feature, top_tokens FROM features WHERE sae_id = ? AND instr(lower(top_tokens), lower(?)) > 0 "
            "ORDER BY density DESC LIMIT ?", (self._id(name), text.strip(), limit)).fetchall()
        return [(int(r[0]), r[1]) for r in rows]

    def densities(self, name: str) -> np.ndarray:
        rows = self.con.execute("SELECT density FROM features WHERE sae_id = ? ORDER BY feature",
                                (self._id(name),)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.float64)

    def dead_features(self, name: str) -> list[int]:
        rows = self.con.execute("SELECT feature FROM features WHERE sae_id = ? AND density = 0 ORDER BY feature",
                                (self._id(name),)).fetchall()
        return [int(r[0]) for r in rows]

    def training_log(self, name: str) -> list[dict[str, Any]]:
        rows = self.con.execute("SELECT step, dead_frac, l0, fvu FROM training_log WHERE sae_id = ? ORDER BY step",
                                (self._id(name),)).fetchall()
        return [dict(r) for r in rows]
