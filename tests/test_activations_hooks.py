"""Hook names: validation against the model, flattened widths, and how far the forward pass must run."""

from __future__ import annotations

import pytest

from activations.hooks import HookError, HookSpec, hook_layer, resolve_hooks, stop_layer


def test_resolve_hooks_widths(tiny_model):
    specs = resolve_hooks(
        tiny_model,
        [
            "blocks.0.hook_resid_post",
            "blocks.1.attn.hook_z",
            "blocks.2.mlp.hook_post",
            "hook_embed",
            "ln_final.hook_normalized",
        ],
    )
    assert specs == [
        HookSpec("blocks.0.hook_resid_post", 0, 32),  # d_model
        HookSpec("blocks.1.attn.hook_z", 1, 32),  # n_heads * d_head = 4 * 8
        HookSpec("blocks.2.mlp.hook_post", 2, 64),  # d_mlp
        HookSpec("hook_embed", None, 32),
        HookSpec("ln_final.hook_normalized", None, 32),
    ]


def test_resolve_hooks_per_head_and_mlp_pre(tiny_model):
    specs = resolve_hooks(tiny_model, ["blocks.2.attn.hook_q", "blocks.0.mlp.hook_pre"])
    assert [(s.layer, s.d_in) for s in specs] == [(2, 32), (0, 64)]


def test_unknown_hook_lists_nearest_names(tiny_model):
    with pytest.raises(HookError) as info:
        resolve_hooks(tiny_model, ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pots"])
    message = str(info.value)
    assert message.startswith("unknown hook 'blocks.1.hook_resid_pots' for custom (3 layers); nearest: ")
    nearest = message.split("nearest: ")[1].split(", ")
    assert nearest[0] == "blocks.1.hook_resid_post"
    assert 2 <= len(nearest) <= 5 and all(name in tiny_model.hook_dict for name in nearest)


def test_unknown_hook_without_close_match(tiny_model):
    with pytest.raises(HookError) as info:
        resolve_hooks(tiny_model, ["zzzz"])
    assert str(info.value) == "unknown hook 'zzzz' for custom (3 layers)"


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"])
def test_attention_maps_are_refused(tiny_model, name):
    with pytest.raises(HookError) as info:
        resolve_hooks(tiny_model, [name])
    assert str(info.value) == (
        f"hook {name!r} holds attention maps, not one vector per token; cache hook_z, hook_resid_* "
        "or hook_*_out instead"
    )


def test_duplicate_hooks_are_refused(tiny_model):
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.hook_resid_post"]
    with pytest.raises(HookError) as info:
        resolve_hooks(tiny_model, names)
    assert str(info.value) == f"hook names repeat: {names}"


def test_no_hooks(tiny_model):
    with pytest.raises(HookError, match=r"^give at least one --hook, e\.g\. blocks\.6\.hook_resid_post$"):
        resolve_hooks(tiny_model, [])


def test_hook_that_never_fires(tiny_model):
    # hook_result exists on every attention block but only runs with cfg.use_attn_result.
    assert not tiny_model.cfg.use_attn_result
    with pytest.raises(HookError) as info:
        resolve_hooks(tiny_model, ["blocks.1.attn.hook_result"])
    assert (
        str(info.value) == "hook 'blocks.1.attn.hook_result' did not produce a [batch, pos, ...] activation (got None)"
    )


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("blocks.0.hook_resid_pre", 0),
        ("blocks.17.attn.hook_z", 17),
        ("hook_embed", None),
        ("ln_final.hook_scale", None),
    ],
)
def test_hook_layer(name, layer):
    assert hook_layer(name) == layer


def _specs(*names: str) -> list[HookSpec]:
    return [HookSpec(n, hook_layer(n), 1) for n in names]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("blocks.0.hook_resid_post",), 1),
        (("blocks.3.attn.hook_z", "blocks.0.hook_mlp_out"), 4),
        (("blocks.6.hook_resid_post", "blocks.3.attn.hook_z"), 7),
        (("hook_embed",), 0),  # only the embedding has to run
        (("hook_embed", "blocks.2.hook_resid_mid"), 3),
        (("blocks.9.hook_resid_post",), None),  # the last block: run the whole model
        (("blocks.1.hook_resid_post", "blocks.9.mlp.hook_post"), None),
        (("ln_final.hook_normalized",), None),
        (("blocks.0.hook_resid_post", "ln_final.hook_scale"), None),
    ],
)
def test_stop_layer(names, expected):
    assert stop_layer(_specs(*names), n_layers=10) == expected


def test_stop_layer_truncated_run_matches_full_run(tiny_model):
    """The truncated forward that resolve_hooks and the cache use sees the same activations as a full run."""
    import torch

    tokens = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    names = ["hook_embed", "blocks.1.hook_resid_post"]
    specs = resolve_hooks(tiny_model, names)
    assert stop_layer(specs, tiny_model.cfg.n_layers) == 2
    seen = {}
    with torch.no_grad():
        tiny_model.run_with_hooks(
            tokens,
            fwd_hooks=[(n, lambda act, hook: seen.__setitem__(hook.name, act.clone())) for n in names],
            stop_at_layer=2,
            return_type=None,
        )
        _, full = tiny_model.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(seen[name], full[name], rtol=0, atol=1e-6)
