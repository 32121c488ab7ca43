"""The field table of sae/config.py: each option's role, declared once, and what reads it."""

import dataclasses
import inspect

import pytest

from sae.api import build_trainer
from sae.config import ROLES, SAEConfig, TrainConfig, field_help, fields_with_role, option_roles

# What a resume may change: the TrainConfig keys that describe how the process runs, not the result.
RUN_ONLY = {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "log_every", "progress",
            "sparse_kernels", "prefetch_batches", "device", "autocast"}


def test_every_field_has_one_role_of_its_config():
    roles = option_roles()
    assert list(roles) == [f.name for cls in (SAEConfig, TrainConfig) for f in dataclasses.fields(cls)]
    assert {roles[f.name] for f in dataclasses.fields(SAEConfig)} == {"sae"}
    assert {roles[f.name] for f in dataclasses.fields(TrainConfig)} == {"train", "run_only"}
    assert set(roles.values()) == set(ROLES)


def test_run_only_fields_are_what_a_resume_may_change():
    assert fields_with_role("run_only") == RUN_ONLY
    assert fields_with_role("train") == {f.name for f in dataclasses.fields(TrainConfig)} - RUN_ONLY
    assert fields_with_role() == set(option_roles())


def test_explicit_fields_are_build_trainers_named_arguments():
    named = {p.name for p in inspect.signature(build_trainer).parameters.values() if p.kind is p.KEYWORD_ONLY}
    explicit = fields_with_role(explicit=True)
    assert explicit == (named & set(option_roles())) | {"d_in"}  # d_in is read from the data
    assert explicit == {"arch", "d_in", "n_features", "k", "batch_size", "total_tokens", "lr", "seed"}
    assert fields_with_role(explicit=False) == set(option_roles()) - explicit
    assert fields_with_role("sae", explicit=True) == {"arch", "d_in", "n_features", "k"}


def test_unknown_roles_are_refused():
    with pytest.raises(ValueError, match="unknown field role"):
        fields_with_role("runonly")


@pytest.mark.parametrize("cls", [SAEConfig, TrainConfig])
def test_field_help_reads_every_docstring_and_defaults_stay_class_attributes(cls):
    helps = field_help(cls)
    assert list(helps) == [f.name for f in dataclasses.fields(cls)] and all(helps.values())
    assert TrainConfig.shuffle is True and TrainConfig.batch_size == 4096 and SAEConfig.normalization == "scalar"
