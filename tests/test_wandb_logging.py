"""W&B wiring: mode resolution, what reaches wandb (faked), and a real offline run read back from disk.

Nothing here reaches the network: a real run uses WANDB_MODE=offline in a tmp WANDB_DIR, every other
test replaces wandb.init with a recorder.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb

import sae
from experiments import wandb_logging
from experiments.wandb_logging import WandbRun, l0_histogram_bins, make_log_fn, resolve_mode, scalar_metrics

W_B_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC")


@pytest.fixture(autouse=True)
def no_credentials(tmp_path, monkeypatch):
    """No key anywhere: an empty HOME (no ~/.netrc) and no W&B variables; wandb's own folders in tmp."""
    for var in W_B_ENV:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


# -- resolve_mode -----------------------------------------------------------------------------------


def test_without_a_key_the_mode_falls_back_to_offline_with_one_line(capsys, tmp_path, monkeypatch):
    assert resolve_mode() == "offline"
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert (
        "no API key configured" in lines[0] and f"stored offline under {tmp_path / 'wandb_dir' / 'wandb'};" in lines[0]
    )
    assert lines[0].endswith("upload later with `wandb sync <that folder>/offline-run-<time>-<id>`")
    monkeypatch.delenv("WANDB_DIR")
    assert resolve_mode() == "offline" and "stored offline under wandb;" in capsys.readouterr().err
    assert resolve_mode(announce=False) == "offline" and capsys.readouterr().err == ""


def test_an_explicit_mode_beats_wandb_mode_which_beats_the_key(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode() == "offline"
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's old name for offline
    assert resolve_mode() == "offline"
    assert capsys.readouterr().err == ""  # a chosen mode is no fallback: nothing printed


def test_a_netrc_entry_for_the_wandb_host_means_online(tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login me password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode(announce=False) == "offline"
    netrc.write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    assert resolve_mode(announce=False) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a private server: its own entry
    assert resolve_mode(announce=False) == "offline"
    (Path.home() / ".netrc").write_text("machine wandb.example.org login user password " + "b" * 40 + "\n")
    monkeypatch.delenv("NETRC")
    (Path.home() / ".netrc").chmod(0o600)
    assert resolve_mode(announce=False) == "online"


def test_unknown_modes_are_refused():
    with pytest.raises(sae.SAEConfigError, match=r"unknown W&B mode 'shared-ish'; allowed: online, offline, disabled"):
        resolve_mode("shared-ish")


def test_unknown_wandb_mode_variable_is_refused(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(sae.SAEConfigError, match=r"unknown W&B \$WANDB_MODE 'bogus'"):
        resolve_mode()


# -- what WandbRun hands to wandb (wandb.init replaced by a recorder) --------------------------------


class FakeRun:
    def __init__(self, sync_dir: str):
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.exit_codes: list[int] = []
        self.settings = type("Settings", (), {"sync_dir": sync_dir})()

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self, exit_code=0):
        self.exit_codes.append(exit_code)


@pytest.fixture
def fake_init(monkeypatch, tmp_path):
    calls: list[dict] = []
    runs: list[FakeRun] = []

    def init(**kwargs):
        calls.append(kwargs)
        runs.append(FakeRun(str(tmp_path / "wandb" / f"offline-run-fake-{len(runs)}")))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return calls, runs


STEP_METRICS = {
    "loss": 0.5,
    "fvu": 0.25,
    "aux_loss": 0.125,
    "l0": 32.0,
    "dead_frac": 0.0625,
    "lr": 2e-4,
    "grad_norm": 0.75,
    "threshold": math.inf,
    "tokens_per_s": 4096.0,
}


def test_run_passes_project_name_config_and_fallback_mode_to_wandb_init(fake_init, capsys):
    calls, runs = fake_init
    with WandbRun(project="proj", name="topk-k32", config={"k": 32, "arch": "topk"}, group="g") as run:
        assert run.run_dir == runs[0].settings.sync_dir
    assert calls == [
        {"project": "proj", "name": "topk-k32", "config": {"k": 32, "arch": "topk"}, "mode": "offline", "group": "g"}
    ]
    assert runs[0].exit_codes == [0]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [wandb_logging.offline_note(runs[0].settings.sync_dir)]
    assert lines[0].endswith(f"`wandb sync {runs[0].settings.sync_dir}`")


def test_an_exception_inside_the_run_finishes_it_as_failed(fake_init, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    calls, runs = fake_init
    with pytest.raises(RuntimeError, match="diverged"), WandbRun(project="p", name="n", dir="custom"):
        raise RuntimeError("diverged")
    assert runs[0].exit_codes == [1]
    assert calls[0]["dir"] == "custom" and calls[0]["mode"] == "offline"
    assert capsys.readouterr().err == ""  # WANDB_MODE chose offline: no fallback notice


def test_log_sends_finite_scalars_and_the_density_and_l0_histograms(fake_init):
    _, runs = fake_init
    density = torch.tensor([0.0, 1e-3, 1e-2, 0.1, 1.0], dtype=torch.float64)
    with WandbRun(project="p", mode="offline") as run:
        log_fn = make_log_fn(run)
        log_fn(100, dict(STEP_METRICS))
        run.log(200, {"l0": 3.0, "density": density, "l0_histogram": torch.tensor([0, 3, 0, 5, 0, 0])})
    (step1, first), (step2, second) = runs[0].logged
    assert step1 == 100
    assert first == {f"train/{k}": v for k, v in STEP_METRICS.items() if k != "threshold"}
    assert step2 == 200 and second["train/l0"] == 3.0
    dens = second["train/density_log10"]
    assert isinstance(dens, wandb.Histogram) and sum(dens.histogram) == 5
    assert (dens.bins[0], dens.bins[-1]) == pytest.approx((-10.0, 0.0), abs=1e-9)  # dead: log10(1e-10)
    assert np.flatnonzero(dens.histogram).tolist() == [0, 44, 51, 57, 63]  # log10 = -10, -3, -2, -1, 0 in 64 bins
    l0 = second["train/l0_histogram"]
    assert l0.histogram == [0, 3, 0, 5] and l0.bins == [-0.5, 0.5, 1.5, 2.5, 3.5]
    assert make_log_fn(None) is None


def test_summary_holds_eval_scalars_and_histograms(fake_init):
    _, runs = fake_init
    metrics = {
        "fvu": 0.2,
        "l0": 31.5,
        "dead_frac": 0.0,
        "in_sample": False,
        "eval_source": "runs/demo/cache-eval",
        "n_tokens": np.int64(4096),
        "mode": "inference",
        "batch_mode": {"l0": 32.0, "fvu": 0.19},
        "l0_histogram": torch.tensor([0, 0, 4]),
        "density_histogram": {"edges": [-2.0, -1.0, 0.0], "counts": [1, 2], "n_zero": 3},
    }
    with WandbRun(project="p", mode="offline") as run:
        run.summary(metrics)
    summary = runs[0].summary
    assert {k: v for k, v in summary.items() if not isinstance(v, wandb.Histogram)} == {
        "fvu": 0.2,
        "l0": 31.5,
        "dead_frac": 0.0,
        "in_sample": False,
        "n_tokens": 4096,
        "batch_mode/l0": 32.0,
        "batch_mode/fvu": 0.19,
        "density_histogram/n_zero": 3,
    }
    assert summary["density_log10"].histogram == [1, 2] and summary["density_log10"].bins == [-2.0, -1.0, 0.0]
    assert summary["l0_histogram"].histogram == [0, 0, 4]


def test_scalar_metrics_flattens_and_drops_what_is_not_a_finite_number():
    got = scalar_metrics(
        {
            "a": torch.tensor(2.5),
            "b": [1, 2],
            "c": "text",
            "d": {"e": float("nan"), "f": 1},
            "g": torch.ones(3),
            "h": True,
        }
    )
    assert got == {"a": 2.5, "d/f": 1, "h": True}


def test_long_l0_histograms_are_trimmed_then_merged_under_the_bin_limit():
    counts = np.zeros(4609, dtype=np.int64)
    counts[[0, 7, 1000]] = [5, 11, 2]
    merged, edges = l0_histogram_bins(counts, max_bins=512)
    assert merged.size == 501 and merged.sum() == 18  # 1001 values (0..1000) in bins of 2
    assert (merged[0], merged[3], merged[500]) == (5, 11, 2)
    assert edges[0] == -0.5 and edges[-1] == 1001.5 and edges.size == 502
    small, small_edges = l0_histogram_bins([0, 0, 0])
    assert small.tolist() == [0] and small_edges.tolist() == [-0.5, 0.5]


# -- a real offline run ------------------------------------------------------------------------------


def read_wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's 7-byte header, then LevelDB-log blocks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_offline_run_writes_its_history_and_summary_under_wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "wandb_dir"
    with WandbRun(project="sae-workbench", name="offline-check", config={"k": 8}) as run:
        run.log(1, {"loss": 0.75, "l0": 8.0})
        run.log(2, {"loss": 0.5, "l0": 8.0, "threshold": math.inf})
        run.summary({"fvu": 0.125, "density": torch.tensor([0.0, 0.5, 0.25])})
        run_dir = Path(run.run_dir)
    assert run_dir.parent == root / "wandb" and run_dir.name.startswith("offline-run-")
    (record_file,) = run_dir.glob("run-*.wandb")
    for _ in range(100):  # wandb's service process may still be flushing the file when finish() returns
        records = read_wandb_records(record_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        if kinds and kinds[-1] == "exit":
            break
        time.sleep(0.1)
    assert "run" in kinds and kinds[-1] == "exit" and records[-1].exit.exit_code == 0
    run_record = records[kinds.index("run")].run
    assert (run_record.project, run_record.display_name) == ("sae-workbench", "offline-check")
    history = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [(h["_step"], h["train/loss"], h["train/l0"]) for h in history] == [(1, 0.75, 8.0), (2, 0.5, 8.0)]
    assert all("train/threshold" not in h for h in history)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(i.nested_key) or i.key: i.value_json for i in r.summary.update})
    assert json.loads(summary["fvu"]) == 0.125
    density = json.loads(summary["density_log10"])
    assert density["_type"] == "histogram" and sum(density["values"]) == 3
