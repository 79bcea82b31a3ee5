"""CHIPS scores against their formulas (docs/methods.md, CHIPS), dense solves, and each other."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.func import grad, vmap

from lightning_chips.adapters import EndPoint, resolve_adapter
from lightning_chips.data import TwoDomainPairs
from lightning_chips.features import PairFeatures, extract_features
from lightning_chips.functional import ChipsArguments, bank_loss, chips_prepare, chips_scores
from lightning_chips.functional.chips import ALL_COMPONENTS, COMPONENTS
from lightning_chips.scoring import CHIPS, build_scorer

from .conftest import TINY_VIT

D64 = torch.float64


def _problem(seed: int = 0, n: int = 300, t: int = 12, d_v: int = 10, d_t: int = 6, e: int = 30, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    ep = EndPoint(
        torch.randn(d_v, e, generator=g, dtype=D64) / d_v**0.5,
        torch.randn(d_t, e, generator=g, dtype=D64) / d_t**0.5,
        torch.tensor(2.3, dtype=D64),
        image_bias=torch.randn(e, generator=g, dtype=D64) * 0.1 if bias else None,
    )
    # Target pairs share a direction that part of the pool has too, so alignment has something to find.
    shift_v, shift_t = torch.randn(d_v, generator=g, dtype=D64), torch.randn(d_t, generator=g, dtype=D64)
    pool_v, pool_t = torch.randn(n, d_v, generator=g, dtype=D64), torch.randn(n, d_t, generator=g, dtype=D64)
    pool_v[: n // 5] += shift_v
    pool_t[: n // 5] += shift_t
    target_v = torch.randn(t, d_v, generator=g, dtype=D64) + shift_v
    target_t = torch.randn(t, d_t, generator=g, dtype=D64) + shift_t
    return pool_v, pool_t, target_v, target_t, ep


def _autograd_grads(h_v, h_t, ep, bank_image, bank_text, exclude=None):
    """Per-sample gradients of the bank loss by torch.func (independent of the closed form)."""
    names = ["image_proj", "text_proj", "logit_scale"] + (["image_bias"] if ep.image_bias is not None else [])

    def loss(params, hv, ht, ex):
        endpoint = EndPoint(**dict(zip(names, params, strict=True)))
        return bank_loss(hv[None], ht[None], endpoint, bank_image, bank_text, exclude=None if ex is None else ex[None])[
            0
        ]

    params = tuple(getattr(ep, name) for name in names)
    in_ex = None if exclude is None else 0
    grads = vmap(grad(loss), in_dims=(None, 0, 0, in_ex))(params, h_v, h_t, exclude)
    return torch.cat([gr.reshape(h_v.shape[0], -1) for gr in grads], dim=1)


def test_relevance_and_learnability_equal_their_formulas():
    pool_v, pool_t, target_v, target_t, ep = _problem()
    out = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=None, bank_size=64, seed=3)
    x, y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    mu_x = F.normalize(ep.embed_image(target_v).mean(0), dim=0)
    mu_y = F.normalize(ep.embed_text(target_t).mean(0), dim=0)
    cos_x, cos_y = F.cosine_similarity(x, mu_x[None]), F.cosine_similarity(y, mu_y[None])
    expected_relevance = torch.sigmoid(0.5 * cos_x + 0.5 * cos_y)
    torch.testing.assert_close(out.relevance, expected_relevance)
    lo, hi = torch.sigmoid(torch.tensor(-1.0, dtype=D64)), torch.sigmoid(torch.tensor(1.0, dtype=D64))
    assert bool((out.relevance >= lo).all() and (out.relevance <= hi).all())

    # Learnability from first principles on the same bank (the seeded bank of 64 pool pairs).
    state = chips_prepare(ep, target_v, target_t, pool_v, pool_t, sketch_dim=None, bank_size=64, seed=3)
    bank_idx = state.bank.ids
    s = ep.logit_scale.exp()
    a = s * torch.cat([(x * y).sum(1, keepdim=True), x @ state.bank.text.T], 1)
    b = s * torch.cat([(x * y).sum(1, keepdim=True), y @ state.bank.image.T], 1)
    own = torch.arange(len(x))[:, None] == bank_idx[None, :]
    a[:, 1:][own], b[:, 1:][own] = float("-inf"), float("-inf")
    p_corr = 0.5 * (a.softmax(1)[:, 0] + b.softmax(1)[:, 0])
    margin = 0.5 * ((a[:, 0] - a[:, 1:].max(1).values) + (b[:, 0] - b[:, 1:].max(1).values))
    torch.testing.assert_close(out.learnability, (1 - p_corr) * (1 + torch.sigmoid(-margin)))
    assert bool((out.learnability >= 0).all() and (out.learnability < 2).all())
    torch.testing.assert_close(out.utility, out.alignment * out.learnability * out.relevance)


@pytest.mark.parametrize("bias", [False, True])
def test_exact_alignment_with_alpha_zero_is_the_dense_newton_step(bias):
    """sketch_dim=None, alpha=0: A = g^T (Phi_pos + lambda I)^{-1} u, everything computed densely by autograd."""
    pool_v, pool_t, target_v, target_t, ep = _problem(n=120, d_v=5, d_t=4, e=6, bias=bias)
    lam = 0.05
    out = chips_scores(pool_v, pool_t, target_v, target_t, ep, alpha=0.0, sketch_dim=None, damping=lam,
                       bank_size=10_000, curvature_samples=10_000)  # fmt: skip
    bank_x, bank_y = ep.embed_image(pool_v), ep.embed_text(pool_t)  # the whole pool is the bank ...
    own = torch.eye(len(pool_v), dtype=torch.bool)  # ... and no pair is its own negative
    g = _autograd_grads(pool_v, pool_t, ep, bank_x, bank_y, exclude=own)
    u = _autograd_grads(target_v, target_t, ep, bank_x, bank_y).mean(0)
    phi_pos = g.T @ g / len(g)  # curvature on the whole pool
    expected = g @ torch.linalg.solve(phi_pos + lam * torch.eye(g.shape[1], dtype=D64), u)
    torch.testing.assert_close(out.alignment, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_solver_equals_dense_exact_solve(alpha, bias):
    pool_v, pool_t, target_v, target_t, ep = _problem(n=200, bias=bias)
    kwargs = dict(alpha=alpha, bank_size=64, curvature_samples=80, negatives_per_sample=3, seed=1)
    dense = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=None, **kwargs)
    kernel = chips_scores(pool_v, pool_t, target_v, target_t, ep, solver="kernel", **kwargs)
    rel = (kernel.alignment - dense.alignment).abs().max() / dense.alignment.abs().max()
    assert rel < 1e-8, rel


def test_sketched_alignment_converges_to_exact():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=1500, d_v=10, d_t=6, e=30)
    dim = 10 * 30 + 6 * 30 + 1
    assert 450 <= dim <= 550
    kwargs = dict(bank_size=256, curvature_samples=600)
    exact = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=None, **kwargs).alignment
    rhos = []
    for k in (dim // 8, dim // 2, 4 * dim):
        sketched = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=k, exact_when_small=False, **kwargs)
        rhos.append(spearmanr(exact.numpy(), sketched.alignment.numpy())[0])
    assert rhos[0] < rhos[1] < rhos[2], rhos
    assert rhos[2] >= 0.97, rhos
    rademacher = chips_scores(
        pool_v, pool_t, target_v, target_t, ep, sketch_dim=4 * dim, sketch="rademacher", exact_when_small=False,
        **kwargs,
    )  # fmt: skip
    assert spearmanr(exact.numpy(), rademacher.alignment.numpy())[0] >= 0.97


def test_sketch_is_used_below_dim_theta_and_exact_path_above():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=100)
    small = chips_prepare(ep, target_v, target_t, pool_v, pool_t, sketch_dim=64)
    assert small.sketch_dim == 64  # the Khatri-Rao layout realises sketch_dim exactly
    big = chips_prepare(ep, target_v, target_t, pool_v, pool_t, sketch_dim=10_000)
    assert big.sketch_dim == ep.num_parameters  # exact: dim(theta) <= sketch_dim


def _target_loss(ep: EndPoint, target_v, target_t, bank_x, bank_y) -> torch.Tensor:
    return bank_loss(target_v, target_t, ep, bank_x, bank_y).mean()


@pytest.mark.parametrize("solver_kwargs", [dict(sketch_dim=None), dict(sketch_dim=128), dict(solver="kernel")])
def test_sign_top_alignment_lowers_the_target_loss_more(solver_kwargs):
    """One SGD step on theta with the top-10 % by alignment beats one with the bottom-10 %."""
    pool_v, pool_t, target_v, target_t, ep = _problem(n=400, seed=5)
    out = chips_scores(pool_v, pool_t, target_v, target_t, ep, bank_size=10_000, curvature_samples=400,
                       **solver_kwargs)  # fmt: skip
    bank_x, bank_y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    order = out.alignment.argsort(descending=True)
    top, bottom = order[:40], order[-40:]
    before = _target_loss(ep, target_v, target_t, bank_x, bank_y)

    def after_step(idx):
        params = [t.clone().requires_grad_(True) for t in ep.tensors()]
        stepped = EndPoint(*params)
        own = idx[:, None] == torch.arange(len(pool_v))[None, :]
        bank_loss(pool_v[idx], pool_t[idx], stepped, bank_x, bank_y, exclude=own).mean().backward()
        with torch.no_grad():
            new = EndPoint(*[p - 0.05 * p.grad for p in params])
        return _target_loss(new, target_v, target_t, bank_x, bank_y)

    drop_top, drop_bottom = before - after_step(top), before - after_step(bottom)
    assert drop_top > 0 and drop_top > drop_bottom, (float(drop_top), float(drop_bottom))


def test_scores_do_not_depend_on_batch_size_and_repeat_exactly():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=257)
    kwargs = dict(bank_size=100, curvature_samples=150, sketch_dim=64)
    reference = chips_scores(pool_v, pool_t, target_v, target_t, ep, batch_size=4096, **kwargs)
    for batch_size in (1, 7, 64):
        other = chips_scores(pool_v, pool_t, target_v, target_t, ep, batch_size=batch_size, **kwargs)
        torch.testing.assert_close(other.utility, reference.utility, rtol=1e-12, atol=1e-12)
    again = chips_scores(pool_v, pool_t, target_v, target_t, ep, batch_size=4096, **kwargs)
    assert torch.equal(again.utility, reference.utility)
    reseeded = chips_scores(pool_v, pool_t, target_v, target_t, ep, seed=1, **kwargs)
    assert not torch.equal(reseeded.utility, reference.utility)


def test_streaming_scorer_matches_the_functional_on_a_real_open_clip_model():
    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT))
    adapter = resolve_adapter(model)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    pool = TwoDomainPairs(96, target_fraction=0.3, noise_fraction=0.2, tokenizer=tokenizer)
    target = TwoDomainPairs(16, target_fraction=1.0, split="val", tokenizer=tokenizer)
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=32)  # noqa: E731
    pool_f, target_f = extract_features(adapter, loader(pool)), extract_features(adapter, loader(target))
    scorer = build_scorer(
        "chips", sketch_dim=256, bank_size=48, curvature_samples=64, components=("alignment",), alpha=0.7
    )  # the functional default: the paper's curvature mix
    assert isinstance(scorer, CHIPS)
    scorer.prepare(adapter.endpoint(), target_f, pool_f)
    streamed = torch.cat([scorer.score(batch) for batch in pool_f.batches(20)])
    # The functional API (ids = positions) on the same features gives the same numbers.
    direct = chips_scores(
        pool_f.image, pool_f.text, target_f.image, target_f.text, adapter.endpoint(), sketch_dim=256, bank_size=48,
        curvature_samples=64, components=("alignment",),
    )  # fmt: skip
    torch.testing.assert_close(streamed, direct.utility)
    torch.testing.assert_close(streamed, direct.alignment)
    assert "k=" in scorer.summary() and streamed.shape == (96,)


def _held_elements(obj, seen=None) -> int:
    """Elements of every tensor reachable from ``obj`` (dataclass fields, attributes, tuples, lists, dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, list | tuple):
        return sum(_held_elements(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_held_elements(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_held_elements(x, seen) for x in vars(obj).values())
    return 0


@pytest.mark.parametrize("components", [COMPONENTS, ALL_COMPONENTS])
def test_the_prepared_state_holds_the_same_memory_whatever_the_pool_size(components):
    """The state a round keeps for scoring millions of pairs (bank, direction, mean embeddings, the reference end
    point) does not grow with the pool sample: 10 x more pool pairs, the same number of held elements."""
    held = []
    for n in (300, 3000):
        pool_v, pool_t, target_v, target_t, ep = _problem(n=n)
        scorer = CHIPS(sketch_dim=64, bank_size=50, curvature_samples=100, components=components, reference_steps=2)
        ids = torch.arange(n)
        scorer.prepare(ep, PairFeatures(ids[:12], target_v, target_t), PairFeatures(ids, pool_v, pool_t))
        held.append(_held_elements(scorer.state))
    assert held[0] == held[1] > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"components": ("alignment", "vibes")}, "components"),
        ({"sketch_dim": 2}, "sketch_dim"),
        ({"solver": "cg"}, "solver"),
        ({"damping": 0.0}, "damping"),
        ({"bank_size": 0}, "bank_size"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_bad_arguments_are_rejected_eagerly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CHIPS(**kwargs)
    with pytest.raises(ValueError, match=match):  # the one place they are validated
        ChipsArguments(**kwargs)
    pool_v, pool_t, target_v, target_t, ep = _problem(n=20)
    with pytest.raises(ValueError, match=match):  # the functional forms too, before any work
        chips_scores(pool_v, pool_t, target_v, target_t, ep, **kwargs)


def test_one_arguments_object_drives_the_scorer_and_the_functional_forms():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=120)
    args = ChipsArguments(bank_size=40, curvature_samples=80, sketch_dim=48, alpha=0.5, seed=3)  # the paper's
    scorer = CHIPS(bank_size=40, curvature_samples=80, sketch_dim=48, alpha=0.5, seed=3, components="paper")
    assert scorer.arguments == args and scorer.alpha == 0.5 and scorer.components == args.components
    by_object = chips_scores(pool_v, pool_t, target_v, target_t, ep, args).utility
    by_keywords = chips_scores(pool_v, pool_t, target_v, target_t, ep, bank_size=40, curvature_samples=80,
                               sketch_dim=48, alpha=0.5, seed=3).utility  # fmt: skip
    assert torch.equal(by_object, by_keywords)
    ids = torch.arange(120)
    scorer.prepare(ep, PairFeatures(ids[:12], target_v, target_t), PairFeatures(ids, pool_v, pool_t))
    torch.testing.assert_close(scorer.score(PairFeatures(ids, pool_v, pool_t)), by_object, rtol=1e-12, atol=1e-12)
    overridden = chips_scores(pool_v, pool_t, target_v, target_t, ep, args, alpha=0.9).utility
    assert not torch.equal(overridden, by_object)  # a keyword overrides the object's field
    with pytest.raises(TypeError, match="Unknown CHIPS argument.*'alpah'"):
        chips_scores(pool_v, pool_t, target_v, target_t, ep, alpah=0.5)


def test_empty_target_is_an_error():
    pool_v, pool_t, _, _, ep = _problem(n=20)
    ids = torch.arange(20)
    with pytest.raises(ValueError, match="target"):
        CHIPS().prepare(ep, PairFeatures(ids[:0], pool_v[:0], pool_t[:0]), PairFeatures(ids, pool_v, pool_t))
    with pytest.raises(ValueError, match="unknown|Unknown"):
        build_scorer("chipz")


def test_kernel_solver_refuses_a_gram_matrix_too_large_before_allocating(monkeypatch):
    import lightning_chips.functional.linalg as chips_math

    g = torch.Generator().manual_seed(0)
    ep = EndPoint(torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g), torch.tensor(2.0))
    pool = PairFeatures(torch.arange(40), torch.randn(40, 6, generator=g), torch.randn(40, 5, generator=g))
    monkeypatch.setattr(chips_math, "KERNEL_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="kernel solver needs an R x R Gram"):
        CHIPS(solver="kernel", bank_size=16, curvature_samples=40).prepare(ep, pool.index(slice(0, 8)), pool)
