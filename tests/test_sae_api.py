"""sae.train / sae.load / sae.evaluate: accepted inputs and one clear error per bad input."""

import inspect

import pytest
import torch

import sae
from sae.errors import SAEConfigError, SAEDataError
from sae.synthetic import planted_dictionary_data
from sae.training.streams import ActivationSource, rechunk

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster and repeatably on one thread

D = 16
FAST = dict(progress=False, norm_estimation_batches=4, geometric_median_rows=512)


@pytest.fixture(scope="module")
def acts():
    return planted_dictionary_data(2048, D, 32, 2, seed=4).acts


class FakeCache:
    """Stands in for activations.load_cache(path): d_in, n_tokens, has_grads, iter_batches."""

    model = "fake-model"
    hooks = ["blocks.1.hook_resid_post"]

    def __init__(self, acts, grads=None, chunk=300):
        self.acts, self.grads, self.chunk = acts, grads, chunk
        self.d_in, self.n_tokens, self.has_grads = acts.shape[1], acts.shape[0], grads is not None
        self.calls = []

    def iter_batches(self, batch_size, shuffle=True, seed=0, hook=None):
        self.calls.append((batch_size, shuffle, seed))
        order = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed))
        for lo in range(0, self.n_tokens, self.chunk):  # chunks unrelated to batch_size, partial last one
            rows = order[lo : lo + self.chunk]
            yield self.acts[rows] if self.grads is None else (self.acts[rows], self.grads[rows])


@pytest.fixture
def fake_activations_package(monkeypatch, acts):
    caches = {}

    def load_cache(path):
        caches[str(path)] = FakeCache(acts)
        return caches[str(path)]

    monkeypatch.setattr(sae.api, "load_cache", load_cache)
    return caches


def test_train_from_a_cache_path_reads_one_pass_by_default(tmp_path, fake_activations_package):
    model = sae.train(str(tmp_path), arch="topk", n_features=32, k=2, batch_size=256, seed=3, **FAST)
    cache = fake_activations_package[str(tmp_path)]
    assert model.training_info["steps"] == 2048 // 256
    assert cache.calls and all(call[:2] == (256, True) for call in cache.calls)
    assert model.cfg.d_in == D
    assert model.metadata == {"model_name": "fake-model", "hook_name": "blocks.1.hook_resid_post"}


def test_a_cache_trains_exactly_like_the_same_batches_given_as_a_list(acts):
    cache = FakeCache(acts)
    from_cache = sae.train(cache, arch="mutual_choice", n_features=32, k=2, batch_size=256, seed=0, **FAST)
    assert {seed for _, _, seed in cache.calls} == {0}  # one pass, read with the run's seed
    as_list = list(FakeCache(acts).iter_batches(256, seed=0))  # the same rows in the same order
    from_list = sae.train(as_list, arch="mutual_choice", n_features=32, k=2, batch_size=256, seed=0, **FAST)
    assert from_cache.training_info["steps"] == from_list.training_info["steps"] == 8
    for name, tensor in from_cache.state_dict().items():
        assert torch.equal(tensor, from_list.state_dict()[name]), name


def test_train_from_an_iterable_of_uneven_batches_and_pairs(acts):
    grads = torch.randn_like(acts)
    pairs = [(acts[lo : lo + 100], grads[lo : lo + 100]) for lo in range(0, 2048, 100)]
    model = sae.train(pairs, arch="gradient_topk", n_features=32, k=2, batch_size=128, **FAST)
    assert model.training_info["steps"] == 2048 // 128


def test_one_shot_iterator_needs_total_tokens(acts):
    def generator():
        yield from acts.split(100)

    with pytest.raises(SAEConfigError, match="total_tokens is required when activations is a one-shot iterator"):
        sae.train(generator(), arch="topk", n_features=32, k=2, batch_size=128, **FAST)
    model = sae.train(generator(), arch="topk", n_features=32, k=2, batch_size=128, total_tokens=1280, **FAST)
    assert model.training_info["steps"] == 10
    with pytest.raises(SAEDataError, match="ran out at step 5 of 20"):
        sae.train(
            iter(acts[:700].split(100)), arch="topk", n_features=32, k=2, batch_size=128, total_tokens=2560, **FAST
        )


def test_rechunk_yields_exact_batches_and_drops_the_remainder():
    parts = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) for n in (3, 5, 1, 4)]
    out = [x for x, _ in rechunk(parts, 4)]
    assert [len(x) for x in out] == [4, 4, 4]
    assert torch.equal(torch.cat(out), torch.cat(parts)[:12])


def test_gradient_sae_without_gradients_points_to_the_cache_flag(acts, tmp_path, fake_activations_package):
    message = r"trains on per-token LM-loss gradients: cache activations with gradients \(`saewb cache --with-grads`\)"
    with pytest.raises(SAEDataError, match=message):
        sae.train(acts, arch="gradient_topk", n_features=32, k=2, batch_size=128, **FAST)
    with pytest.raises(SAEDataError, match=message):
        sae.train(tmp_path, arch="gradient_topk", n_features=32, k=2, batch_size=128, **FAST)


def test_unknown_architecture_lists_the_registered_ones(acts):
    with pytest.raises(
        SAEConfigError,
        match="unknown arch 'batchtopk'; registered architectures: topk, mutual_choice, feature_choice, gradient_topk",
    ):
        sae.train(acts, arch="batchtopk", n_features=32, k=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_features=32, k=32), "k=32 must be smaller than n_features=32"),
        (dict(n_features=32, k=40), "k=40 must be smaller than n_features=32"),
        (dict(n_features=0, k=2), "n_features must be a positive integer, got 0"),
        (dict(n_features=32, k=0), "k must be a positive integer, got 0"),
        (dict(n_features=32, k=-3), "k must be a positive integer, got -3"),
        (dict(n_features=32, k=2, batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(n_features=32, k=2, lr=0.0), "lr must be a positive number, got 0.0"),
        (dict(n_features=32, k=2, lr=-1e-3), "lr must be a positive number, got -0.001"),
        (dict(n_features=32, k=2, total_tokens=-5), "total_tokens must be a positive integer, got -5"),
        (
            dict(n_features=32, k=2, normalization="layernorm"),
            "unknown normalization 'layernorm'; allowed: scalar, per_token_standardize, none",
        ),
        (dict(n_features=32, k=2, aux_loss="l1"), "unknown aux_loss 'l1'; allowed: auxk, aux_zipf, none"),
        (dict(n_features=32, k=2, warmup=5), "unknown option\\(s\\) warmup; allowed: .*warmup_steps"),
    ],
)
def test_bad_settings_give_one_clear_error(acts, kwargs, message):
    with pytest.raises(SAEConfigError, match=message):
        sae.train(acts, arch="topk", **{"progress": False, **kwargs})


def test_feature_choice_batch_too_small_names_the_minimum(acts):
    with pytest.raises(SAEConfigError, match=r"the minimum batch size for n_features=512, k=4.* is 128"):
        sae.train(acts, arch="feature_choice", n_features=512, k=4, batch_size=100, **FAST)


def test_bad_activation_inputs(acts):
    with pytest.raises(SAEDataError, match=r"2-D tensor \[N, d\], got shape \(2048,\)"):
        sae.train(acts[:, 0], arch="topk", n_features=32, k=2)
    with pytest.raises(SAEConfigError, match="batch_size=4096 is larger than the 2048 activation rows"):
        sae.train(acts, arch="topk", n_features=32, k=2)
    with pytest.raises(SAEDataError, match="a batch has width 8 after batches of width 16"):
        sae.train([acts[:500], acts[500:1000, :8]], arch="topk", n_features=32, k=2, batch_size=256, **FAST)
    with pytest.raises(SAEConfigError, match="activations must be a tensor .* got int"):
        sae.train(3, arch="topk", n_features=32, k=2)


def test_public_api_names():
    assert set(sae.TRAINABLE) == {"topk", "mutual_choice", "feature_choice", "gradient_topk"}
    assert sae.ARCHITECTURES["topk"].__name__ == "TopKSAE"
    for name in ("train", "load", "evaluate", "SAE", "SAEConfig", "TrainConfig", "MetricsAccumulator"):
        assert hasattr(sae, name), name


def test_shuffle_buffer_rows_reaches_a_real_cache_reader(tmp_path, acts):
    """A bounded shuffle buffer is the knob for reading memory; it must reach iter_batches."""
    import activations.reader as reader
    from tests.conftest import write_cache

    cache = reader.load_cache(write_cache(tmp_path / "cache", acts, shard_rows=512))
    seen = []
    original = reader.ActivationCache.iter_batches

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("buffer_rows"))
        return original(self, *args, **kwargs)

    reader.ActivationCache.iter_batches = spy
    try:
        sae.train(cache, arch="topk", n_features=32, k=2, batch_size=256, shuffle_buffer_rows=600, **FAST)
        sae.train(cache, arch="topk", n_features=32, k=2, batch_size=256, **FAST)
    finally:
        reader.ActivationCache.iter_batches = original
    assert 600 in seen and None in seen  # set: passed on; unset: the reader's own default
    with pytest.raises(SAEConfigError, match="shuffle_buffer_rows must be a positive integer"):
        sae.train(cache, arch="topk", n_features=32, k=2, batch_size=256, shuffle_buffer_rows=0, **FAST)


@pytest.mark.parametrize("option,value,message", [
    ("prefetch_batches", -1, "prefetch_batches must be an integer >= 0, got -1"),
    ("prefetch_batches", 1.5, "prefetch_batches must be an integer >= 0, got 1.5"),
    ("fire_threshold", -0.1, "fire_threshold must be >= 0, got -0.1"),
])
def test_new_train_options_refuse_bad_values(acts, option, value, message):
    with pytest.raises(SAEConfigError, match=message.replace(".", "\\.")):
        sae.train(acts, arch="topk", n_features=32, k=2, batch_size=256, **{option: value}, **FAST)


def _float_fields(cls) -> list[str]:
    import dataclasses

    sample = cls(arch="topk", d_in=4, n_features=8, k=2) if cls is sae.SAEConfig else cls()
    return [f.name for f in dataclasses.fields(cls) if isinstance(getattr(sample, f.name), float)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    ("cls", "name"),
    [(c, n) for c in (sae.SAEConfig, sae.TrainConfig) for n in _float_fields(c)] + [(sae.TrainConfig, "lr")],
)
def test_every_float_option_must_be_finite(cls, name, bad):
    """Bug fixed: NaN passed the `<= 0` checks (e.g. --adam-eps nan gave a torch traceback, --grad-clip nan a
    hint blaming lr); every float field is now checked once, generically, and named in the message."""
    base = {"arch": "topk", "d_in": 4, "n_features": 8, "k": 2} if cls is sae.SAEConfig else {}
    with pytest.raises(SAEConfigError, match=f"^{name} must be a finite number, got {bad!r}"):
        cls(**base, **{name: bad})


def test_a_batch_larger_than_the_cache_names_both_sizes(acts):
    """Bug fixed: --batch-size 50000 on a smaller cache said total_tokens=0, which the user never set."""
    with pytest.raises(SAEConfigError, match=r"batch_size=4096 is larger than the 2048 rows of the activation cache"):
        sae.train(FakeCache(acts), arch="topk", n_features=32, k=2, batch_size=4096, **FAST)


def test_caches_are_activation_sources_and_plain_data_is_not(tmp_path, acts):
    """The trainer recognises a cache by the ActivationSource protocol (d_in, n_tokens, has_grads, iter_batches)."""
    import activations.reader as reader
    from tests.conftest import write_cache

    cache = reader.load_cache(write_cache(tmp_path / "cache", acts, shard_rows=512))
    assert isinstance(cache, ActivationSource) and isinstance(FakeCache(acts), ActivationSource)
    assert not isinstance(acts, ActivationSource) and not isinstance([acts], ActivationSource)
    assert sae.train.__doc__ and "build_trainer" in sae.train.__doc__
    assert list(inspect.signature(sae.train).parameters) == list(inspect.signature(sae.build_trainer).parameters)
