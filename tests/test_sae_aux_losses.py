"""AuxK and aux_zipf (docs/ALGORITHMS.md §1, §4, §11)."""

import pytest
import torch

from sae.aux_losses import aux_support, aux_zipf_loss, auxk_loss, zipf_weights
from sae.sparse_code import Support

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster and repeatably on one thread

N, D, F = 64, 8, 40


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre_acts = torch.randn(N, F, generator=g, requires_grad=True)
    residual = torch.randn(N, D, generator=g)
    W_dec = torch.randn(F, D, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_(True)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=g)[:12]] = True
    return pre_acts, residual, W_dec, dead


def reference_auxk(pre_acts, residual, W_dec, dead, k_aux, selected=None):
    """Float64 loop over tokens, written from the formula in docs/ALGORITHMS.md §1: per token the k_aux largest
    ReLU(a) among dead latents that the token did not select, times min(#dead / k_aux, 1)."""
    a, e, W = pre_acts.detach().double(), residual.double(), W_dec.detach().double()
    dead_idx = dead.nonzero().flatten()
    e_hat = torch.zeros_like(e)
    for t in range(len(a)):
        own = set() if selected is None else set(selected[t].nonzero().flatten().tolist())
        idx = torch.tensor([i for i in dead_idx.tolist() if i not in own], dtype=torch.int64)
        vals = a[t, idx].relu()
        top = vals.topk(min(k_aux, len(idx))).indices
        e_hat[t] = (vals[top].unsqueeze(1) * W[idx[top]]).sum(dim=0)
    scale = min(len(dead_idx) / k_aux, 1.0)
    return scale * float((e - e_hat).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum())


def test_auxk_is_zero_without_dead_latents():
    pre_acts, residual, W_dec, dead = inputs()
    loss = auxk_loss(pre_acts, residual, W_dec, torch.zeros(F, dtype=torch.bool), k_aux=4)
    assert loss.item() == 0.0


@pytest.mark.parametrize("k_aux", [1, 4, 100])
def test_auxk_matches_a_float64_reference(k_aux):
    pre_acts, residual, W_dec, dead = inputs()
    got = auxk_loss(pre_acts, residual, W_dec, dead, k_aux).item()
    assert got == pytest.approx(reference_auxk(pre_acts, residual, W_dec, dead, k_aux), rel=1e-5)
    unscaled = got / min(int(dead.sum()) / k_aux, 1.0)
    assert 0.5 < unscaled < 2.0  # non-trivial: neither zero nor a perfect fit


def test_k_aux_is_clamped_to_the_candidates_and_the_term_scaled_by_their_share():
    """With 12 dead latents and k_aux = 1000, every dead latent is used and the term is x 12/1000
    (SAELens' min(#dead / k_aux, 1)): a few candidates are not asked to explain the whole residual."""
    pre_acts, residual, W_dec, dead = inputs()
    n_dead = int(dead.sum())
    clamped = auxk_loss(pre_acts, residual, W_dec, dead, n_dead)
    assert auxk_loss(pre_acts, residual, W_dec, dead, 1000).item() == pytest.approx(
        clamped.item() * n_dead / 1000, rel=1e-6
    )


@pytest.mark.parametrize("k_aux", [1, 4, 100])
def test_aux_candidates_never_include_the_tokens_own_selected_latents(k_aux):
    """Bug fixed: 11% of aux_zipf entries were latents already in the token's main code."""
    pre_acts, residual, W_dec, dead = inputs()
    selected = torch.rand(N, F, generator=torch.Generator().manual_seed(4)) < 0.5  # many dead latents selected
    assert bool((selected & dead).any())
    support = aux_support(pre_acts.detach(), dead.float(), k_aux, exclude=Support.from_mask(selected))
    assert not bool(selected[support.rows, support.cols].any())
    got = auxk_loss(pre_acts, residual, W_dec, dead, k_aux, exclude=Support.from_mask(selected)).item()
    assert got == pytest.approx(reference_auxk(pre_acts, residual, W_dec, dead, k_aux, selected), rel=1e-5)
    zipf = aux_zipf_loss(pre_acts, residual, W_dec, dead.float(), k_aux, exclude=Support.from_mask(selected))
    assert zipf.item() == got  # the exact reduction to AuxK holds with exclusion too


def test_aux_zipf_with_dead_only_weights_equals_auxk_exactly():
    pre_acts, residual, W_dec, dead = inputs()
    auxk = auxk_loss(pre_acts, residual, W_dec, dead, 4)
    auxk.backward()
    grads_auxk = (pre_acts.grad.clone(), W_dec.grad.clone())
    pre_acts.grad, W_dec.grad = None, None
    zipf = aux_zipf_loss(pre_acts, residual, W_dec, dead.float(), 4)
    zipf.backward()
    assert torch.equal(zipf, auxk)
    assert torch.equal(pre_acts.grad, grads_auxk[0]) and torch.equal(W_dec.grad, grads_auxk[1])


def test_aux_zipf_weights_rank_candidates_but_emit_unweighted_values():
    pre_acts, residual, W_dec, dead = inputs()
    weights = torch.zeros(F)
    weights[:3] = torch.tensor([1.0, 0.5, 0.25])
    # with k_aux >= number of candidates, the weights only decide membership: same as AuxK on {0, 1, 2}
    members = weights > 0
    assert torch.equal(
        aux_zipf_loss(pre_acts, residual, W_dec, weights, 3), auxk_loss(pre_acts, residual, W_dec, members, 3)
    )
    # with k_aux = 1 the weighted score picks, per token, argmax of w * ReLU(a) and emits ReLU(a)
    a = pre_acts.detach()
    pick = (weights[:3] * a[:, :3].relu()).argmax(dim=1)
    z = torch.zeros(N, F)
    z[torch.arange(N), pick] = a[torch.arange(N), pick].relu()
    e_hat = z @ W_dec.detach()
    expected = (residual - e_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    assert aux_zipf_loss(pre_acts, residual, W_dec, weights, 1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_aux_loss_is_zero_when_not_finite():
    pre_acts, _, W_dec, dead = inputs()
    constant_residual = torch.ones(N, D)  # ||e - mean(e)||^2 = 0
    assert auxk_loss(pre_acts, constant_residual, W_dec, dead, 4).item() == 0.0


def test_zipf_weights_zero_on_the_fitted_curve_one_for_dead_and_partial_below():
    ranks = torch.arange(1, F + 1, dtype=torch.float64)
    density = 0.2 * ranks**-1.2
    density = density[torch.randperm(F, generator=torch.Generator().manual_seed(0))]  # order must not matter
    dead = torch.zeros(F, dtype=torch.bool)
    assert zipf_weights(density, dead).abs().max().item() == 0.0
    tail = int(torch.argmin(density))  # rank F, outside the fitted head (ranks <= 0.8 F)
    density[tail] *= 0.25
    dead[3] = True
    w = zipf_weights(density, dead)
    assert w[tail].item() == pytest.approx(0.75, abs=1e-6)
    assert w[3].item() == 1.0
    others = torch.ones(F, dtype=torch.bool)
    others[[tail, 3]] = False
    assert w[others].abs().max().item() == 0.0


@pytest.mark.parametrize(("dip", "expected"), [(0.8, 0.0), (0.3, 0.7)])
def test_zipf_weights_leave_latents_just_below_the_curve_out(dip, expected):
    """Bug fixed: every latent below the least-squares line got a positive weight (about half of them);
    only latents at most under_use x the curve are candidates now. (Ranks are by density, so a dip only
    stays below the curve at the end of the ranking: the least dense latent.)"""
    ranks = torch.arange(1, F + 1, dtype=torch.float64)
    density = 0.2 * ranks**-1.2
    dead = torch.zeros(F, dtype=torch.bool)
    density[-1] *= dip
    w = zipf_weights(density, dead)
    assert w[-1].item() == pytest.approx(expected, abs=1e-6)
    assert int((w > 0).sum()) == int(expected > 0)  # nothing else is a candidate
    assert zipf_weights(density, dead, under_use=1.0)[-1].item() == pytest.approx(1 - dip, abs=1e-6)


def test_zipf_weights_fall_back_to_dead_mask_without_a_curve():
    dead = torch.tensor([True, False, False, True])
    assert torch.equal(zipf_weights(torch.zeros(4), dead), dead.float())
