"""Selection-rule invariants of every architecture (docs/ALGORITHMS.md §1-§5, §11)."""

import pytest
import torch

from sae.architectures.feature_choice import FeatureChoiceSAE, largest_remainder
from sae.base import update_threshold_ema
from sae.config import SAEConfig
from sae.errors import SAEConfigError, SAEDataError
from sae.registry import get_architecture
from sae.sparse_code import SparseCode, Support

D, F, K = 16, 128, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run faster (and the same) on one thread; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(arch: str, seed: int = 0, **options):
    return get_architecture(arch)(SAEConfig(arch=arch, d_in=D, n_features=F, k=K, **options), seed=seed)


def batch(n: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_topk_l0_is_exactly_k_in_training_and_inference():
    sae = make("topk")
    x = batch()
    x_n, _, _ = sae.normalize(x)
    assert (sae.pre_acts(x_n) > 0).sum(dim=1).min() >= K  # precondition: enough positive pre-activations
    z_train, selection = sae.encode_train(x_n)
    z_infer = sae.encode(x)
    assert selection.mask.sum(dim=1).eq(K).all()
    assert (z_train > 0).sum(dim=1).eq(K).all()
    assert torch.equal(z_train, z_infer)


def test_topk_inference_k_keeps_more_latents():
    sae = make("topk", inference_k=3 * K)
    assert (sae.encode(batch()) > 0).sum(dim=1).eq(3 * K).all()


def test_mutual_choice_batch_mean_l0_is_exactly_k_and_varies_per_token():
    sae = make("mutual_choice")
    x = batch(300)
    x_n, _, _ = sae.normalize(x)
    z, selection = sae.encode_train(x_n)
    per_token = (z > 0).sum(dim=1).double()
    assert int(selection.mask.sum()) == K * 300
    assert per_token.mean().item() == K
    assert per_token.std().item() > 0.5  # a global budget, not TopK in disguise


def test_mutual_choice_inference_is_single_threshold_jumprelu():
    sae = make("mutual_choice")
    with pytest.raises(SAEConfigError, match="no inference threshold yet"):
        sae.encode(batch())
    sae.threshold.fill_(0.3)
    sae.threshold_initialized.fill_(True)
    x = batch()
    a = sae.pre_acts(sae.normalize(x)[0])
    expected = a.relu() * (a > 0.3)
    assert torch.equal(sae.encode(x), expected)


def test_mutual_choice_threshold_ema_starts_from_first_minimum():
    sae = make("mutual_choice", threshold_beta=0.9, threshold_start_step=5)
    z = torch.tensor([[0.0, 2.0], [0.5, 3.0]])
    support = Support.from_mask(torch.ones(2, 2, dtype=torch.bool))
    code = SparseCode(support, z.flatten())
    sae.observe(code, step=4, total_steps=1000)  # before the start step: no update
    assert not bool(sae.threshold_initialized)
    sae.observe(code, step=5, total_steps=1000)
    assert sae.threshold.item() == 0.5  # min selected positive value (the 0.0 is not positive)
    sae.observe(SparseCode(support, z.flatten() * 2), step=6, total_steps=1000)
    assert sae.threshold.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)


def test_threshold_start_is_clipped_to_a_tenth_of_the_run():
    sae = make("mutual_choice", threshold_start_step=1000)
    sae.observe(SparseCode(Support.from_mask(torch.ones(1, 1, dtype=torch.bool)), torch.ones(1)), step=10,
                total_steps=100)
    assert bool(sae.threshold_initialized)


def test_update_threshold_ema_only_touches_valid_entries():
    theta = torch.tensor([1.0, 2.0, float("inf")])
    initialized = torch.tensor([True, True, False])
    update_threshold_ema(theta, initialized, torch.tensor([3.0, 9.0, 5.0]), torch.tensor([True, False, True]), 0.5)
    assert theta.tolist() == [2.0, 2.0, 5.0]
    assert initialized.tolist() == [True, True, True]


@pytest.mark.parametrize("batch_size", [256, 300])
def test_feature_choice_uniform_column_counts_match_capacities(batch_size):
    sae = make("feature_choice", fc_capacity="uniform")
    x_n, _, _ = sae.normalize(batch(batch_size))
    _, selection = sae.encode_train(x_n)
    m = sae.capacities(batch_size)
    assert int(m.sum()) == K * batch_size
    assert torch.equal(selection.mask.sum(dim=0), m)
    assert set(m.tolist()) <= {K * batch_size // F, K * batch_size // F + 1}


def test_feature_choice_zipf_capacities_follow_demand_rank():
    sae = make("feature_choice", fc_capacity="zipf", fc_zipf_s=1.0)
    sae.demand_ema.copy_(torch.rand(F, generator=torch.Generator().manual_seed(3)))
    B = 256
    x_n, _, _ = sae.normalize(batch(B))
    _, selection = sae.encode_train(x_n)
    m = sae.capacities(B)
    assert int(m.sum()) == K * B
    assert torch.equal(selection.mask.sum(dim=0), m)
    assert int(m.min()) >= 1 and int(m.max()) <= B
    by_demand = m[torch.argsort(sae.demand_ema, descending=True)]
    assert (by_demand[:-1] >= by_demand[1:]).all()  # more demanded latents get at least as much capacity
    assert by_demand[0] > by_demand[-1]


def test_feature_choice_demand_counts_each_tokens_top_k_positive_latents():
    sae = make("feature_choice", fc_capacity="zipf")
    a = torch.full((4, F), -1.0)
    a[:, :K] = torch.linspace(2.0, 1.0, K)  # every token's top-k is latents 0..K-1, K-1 the weakest
    a[0, K] = 5.0  # token 0 prefers latent K to latent K-1
    demand = sae.measure_demand(a)
    expected = torch.zeros(F)
    expected[: K - 1] = 1.0
    expected[K - 1] = 0.75
    expected[K] = 0.25
    assert torch.allclose(demand, expected)
    assert torch.equal(sae.measure_demand(torch.full((4, F), -1.0)), torch.zeros(F))  # no positive entry, no demand


def test_feature_choice_zipf_ranking_follows_the_data_not_the_latent_index():
    """Bug fixed: ranks came from FC's own density, which *is* the capacity given, so the step-0 order
    (latent index, all densities 0, stable sort) stayed forever. Here only latents F/2..F-1 match the data:
    after training, the largest capacities must belong to them."""
    import sae as sae_lib

    # d = 64: random directions are nearly orthogonal to the atoms; k = 2 atoms per sample, so each token's
    # top-k is its own two atoms rather than random latents.
    d, n_f, half, k = 64, 64, 32, 2
    probe = get_architecture("feature_choice")(SAEConfig(arch="feature_choice", d_in=d, n_features=n_f, k=k), seed=0)
    g = torch.Generator().manual_seed(5)
    atoms = probe.W_dec.detach()[half:]  # the initial decoder rows of the high-index latents
    picks = torch.randint(0, half, (8192, 2), generator=g)
    x = (atoms[picks] * (0.5 + torch.rand(8192, 2, 1, generator=g))).sum(dim=1)
    model = sae_lib.train(
        x, arch="feature_choice", n_features=n_f, k=k, batch_size=256, lr=1e-3, seed=0, progress=False,
        fc_capacity="zipf", normalization="none", encoder_init_scale=False,
    )
    m = model.capacities(256)
    top = torch.argsort(m, descending=True, stable=True)[: half // 2]  # the 16 largest capacities
    assert bool((top >= half).all()), f"largest capacities went to latents {sorted(top.tolist())}"


def test_largest_remainder_caps_and_rounds():
    shares = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert largest_remainder(shares, 10, cap=10).tolist() == [5, 3, 2]
    # 0.5*10 = 5 > cap 4: clip to 4, spread 6 over 0.3:0.2 -> 3.6, 2.4 -> floors 3, 2 + one to 3.6
    assert largest_remainder(shares, 10, cap=4).tolist() == [4, 4, 2]


def test_feature_choice_capacities_default_to_zipf():
    assert SAEConfig(arch="feature_choice", d_in=8, n_features=128, k=8).fc_capacity == "zipf"
    m = make("feature_choice").capacities(256)
    assert int(m.max()) > int(m.min())  # not uniform


def test_feature_choice_rejects_batches_below_one_token_per_feature():
    for capacity in ("uniform", "zipf"):  # Zipf capacities are floored at one token: the same minimum F/k
        sae = make("feature_choice", fc_capacity=capacity)
        with pytest.raises(SAEConfigError, match=r"minimum batch size for n_features=128, k=8 is 16 \(F/k"):
            sae.check_batch_size(15)  # F/k = 128/8 = 16
        sae.check_batch_size(16)
        assert int(sae.capacities(16).min()) == 1 and int(sae.capacities(16).sum()) == K * 16


def test_zipf_capacities_are_floored_at_one_token_where_the_law_would_give_less():
    # F=16384, k=32, B=4096: the Zipf(1) tail's share of k*B is below one token from rank ~12,750 on; before the
    # floor this batch was refused (a minimum of 5,265 rows)
    wide = FeatureChoiceSAE(SAEConfig(arch="feature_choice", d_in=8, n_features=16384, k=32, fc_capacity="zipf"))
    B = 4096
    wide.check_batch_size(B)
    m = wide.capacities_by_rank(B)[0].cpu()
    assert int(m.sum()) == 32 * B and int(m.min()) == 1 and int(m.max()) <= B
    assert (m[:-1] >= m[1:]).all()  # by demand rank: non-increasing
    # above the floor the law holds: each m_r within one token of the float64 reference clip(lam / r, 1, B)
    real = clipped_reference(1 / torch.arange(1, 16385, dtype=torch.float64), 32 * B, 1, B)
    assert ((m.double() - real).abs() < 1.0).all()
    assert int((real == 1).sum()) > 2000 and int((real == B).sum()) >= 1  # a floored tail and a capped head


def clipped_reference(shares: torch.Tensor, total: int, floor: int, cap: int) -> torch.Tensor:
    """clip(lam * shares, floor, cap) summing to total, lam by 2,000 bisection steps in float64."""
    low, high = 0.0, 1e12
    for _ in range(2000):
        mid = (low + high) / 2
        low, high = (mid, high) if float((mid * shares).clamp(floor, cap).sum()) < total else (low, mid)
    return (high * shares).clamp(floor, cap)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_largest_remainder_with_a_floor_against_a_float64_reference(seed):
    g = torch.Generator().manual_seed(seed)
    shares = torch.rand(300, generator=g, dtype=torch.float64) ** 4  # many tiny shares: the floor binds
    shares /= shares.sum()
    total, cap, floor = 2000, 20, 2
    m = largest_remainder(shares, total, cap=cap, floor=floor)
    assert int(m.sum()) == total and int(m.min()) >= floor and int(m.max()) <= cap
    real = clipped_reference(shares, total, floor, cap)
    assert float(real.sum()) == pytest.approx(total, abs=1e-6)
    assert ((m.double() - real).abs() < 1.0).all()  # rounding moves each amount by less than one
    assert int((real == floor).sum()) > 0 and int((real == cap).sum()) > 0  # both bounds were exercised
    # with no amount below the floor the floor changes nothing: the cap-only result, bit for bit
    flat = torch.full((300,), 1 / 300, dtype=torch.float64) + shares / 10
    assert torch.equal(largest_remainder(flat, total, cap=cap, floor=floor), largest_remainder(flat, total, cap=cap))
    with pytest.raises(SAEConfigError, match="at least 2 and at most 20"):
        largest_remainder(shares, 599, cap=cap, floor=floor)  # below 300 latents x 2


def test_feature_choice_inference_uses_per_feature_thresholds():
    sae = make("feature_choice")
    theta = torch.linspace(0.0, 1.0, F)
    sae.threshold.copy_(theta)
    sae.threshold_initialized.fill_(True)
    x = batch()
    a = sae.pre_acts(sae.normalize(x)[0])
    assert torch.equal(sae.encode(x), a.relu() * (a > theta))


def test_gradient_topk_without_gradients_is_plain_topk():
    g_sae, topk = make("gradient_topk"), make("topk")
    x = batch()
    assert torch.equal(g_sae.encode(x), topk.encode(x))


def test_gradient_topk_selects_by_gradient_weighted_score():
    sae = make("gradient_topk", grad_beta=3.0, normalization="none")
    x, g = batch(), batch(seed=7)
    a = sae.pre_acts(x)
    h = g @ sae.W_dec.T
    h = h / h.pow(2).mean(dim=1, keepdim=True).sqrt()
    z = a.relu()
    score = z + 3.0 * z * h.abs()
    expected = torch.zeros_like(z).scatter(1, score.topk(K, dim=1).indices, z.gather(1, score.topk(K, dim=1).indices))
    got = sae.encode(x, g)
    assert torch.allclose(got, expected)
    assert not torch.equal(got, sae.encode(x))  # the gradient changes which latents are kept
    x_n, g_n, _ = sae.normalize(x, g)
    z_train, _ = sae.encode_train(x_n, g_n)
    assert torch.equal(z_train, got)


def test_gradient_topk_uses_gradients_of_the_normalised_input():
    sae = make("gradient_topk")
    sae.norm_scale.fill_(0.25)
    x, g = batch(), batch(seed=7)
    _, g_n, _ = sae.normalize(x, g)
    assert torch.equal(g_n, g / 0.25)  # x_n = c x  =>  dL/dx_n = g / c
    std_sae = make("gradient_topk", normalization="per_token_standardize")
    _, g_std, stats = std_sae.normalize(x, g)
    assert torch.allclose(g_std, g * stats.std)


def test_gradient_topk_rms_normalisation_makes_beta_scale_free():
    sae = make("gradient_topk", grad_beta=1.0)
    x, g = batch(), batch(seed=7)
    assert torch.equal(sae.encode(x, g) > 0, sae.encode(x, 1000 * g) > 0)


def test_gradient_topk_training_without_gradients_names_the_cache_flag():
    sae = make("gradient_topk")
    with pytest.raises(SAEDataError, match="saewb cache --with-grads"):
        sae.encode_train(batch())


def test_per_token_standardize_round_trip_and_decode_needs_inputs():
    sae = make("topk", normalization="per_token_standardize")
    x = 3.0 + 5.0 * batch()
    x_n, _, stats = sae.normalize(x)
    assert torch.allclose(x_n.mean(dim=1), torch.zeros(len(x)), atol=1e-5)
    assert torch.allclose(x_n.std(dim=1), torch.ones(len(x)), atol=1e-4)
    z = sae.encode(x)
    assert torch.allclose(sae.decode(z, x), sae.decode_normalized(z) * stats.std + stats.mean)
    with pytest.raises(SAEConfigError, match="needs x="):
        sae.decode(z)


def test_encode_accepts_leading_dimensions():
    sae = make("topk")
    x = batch(24).reshape(2, 12, D)
    assert sae.encode(x).shape == (2, 12, F)
    assert torch.equal(sae(x), sae(x.reshape(24, D)).reshape(2, 12, D))


def test_width_mismatch_is_a_clear_error():
    with pytest.raises(SAEDataError, match="width 5 but this SAE has d_in=16"):
        make("topk").encode(torch.randn(3, 5))
