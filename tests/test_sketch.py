"""JL sketches of the end-point space (lightning_chips/functional/sketch.py): dimensions, exactness of the factored
application against the dense matrix, adjointness, ``E[P^T P] = I``, seeding, and the variance that motivates the
Khatri-Rao default over the Kronecker layout."""

from __future__ import annotations

import pytest
import torch

from lightning_chips.functional import sketch as sketch_module
from lightning_chips.functional.gradients import EndPointDirection, EndPointGrads
from lightning_chips.functional.linalg import solve_direction
from lightning_chips.functional.sketch import (
    EndPointSketch,
    IdentitySketch,
    KhatriRaoSketch,
    TensorSketch,
    make_sketch,
)

D64 = torch.float64
EXACT_LAYOUTS = ["khatri_rao", "tensorsketch"]  # realised dimension == sketch_dim
ALL = [
    ("khatri_rao", "gaussian"),
    ("khatri_rao", "rademacher"),
    ("tensorsketch", "gaussian"),
    ("kronecker", "gaussian"),
]


def _grads(n, d_v, d_t, e, image_bias=False, text_bias=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return EndPointGrads(
        torch.randn(n, d_v, generator=g, dtype=D64), torch.randn(n, e, generator=g, dtype=D64),
        torch.randn(n, d_t, generator=g, dtype=D64), torch.randn(n, e, generator=g, dtype=D64),
        scale * torch.randn(n, generator=g, dtype=D64), image_bias, text_bias,
    )  # fmt: skip


def _direction(d_v, d_t, e, image_bias=False, text_bias=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    return EndPointDirection(
        torch.randn(d_v, e, generator=g, dtype=D64), torch.randn(d_t, e, generator=g, dtype=D64),
        torch.randn((), generator=g, dtype=D64),
        torch.randn(e, generator=g, dtype=D64) if image_bias else None,
        torch.randn(e, generator=g, dtype=D64) if text_bias else None,
    )  # fmt: skip


def _dense(sk) -> torch.Tensor:
    """``[k, dim(theta)]``: row ``j`` is ``P^T e_j``."""
    eye = torch.eye(sk.dim, dtype=D64)
    return torch.stack([sk.transpose(eye[j]).flatten() for j in range(sk.dim)])


@pytest.mark.parametrize("layout", EXACT_LAYOUTS)
@pytest.mark.parametrize(
    "shape, k", [((7, 5, 4), 20), ((7, 5, 4), 3), ((50, 30, 8), 101), ((1280, 384, 128), 512), ((1, 1, 1), 1)]
)
@pytest.mark.parametrize("bias", [(False, False), (True, False), (True, True)])
def test_realised_dim_is_sketch_dim(layout, shape, k, bias):
    sk = make_sketch(*shape, sketch_dim=k, image_bias=bias[0], text_bias=bias[1], layout=layout,
                     exact_when_small=False)  # fmt: skip
    assert sk.dim == k
    g = _grads(3, *shape, *bias)
    assert sk.sketch_grads(g).shape == (3, k)
    assert sk.sketch_direction(g.weighted_sum(torch.ones(3, dtype=D64))).shape == (k,)
    assert sk.transpose(torch.ones(k, dtype=D64)).flatten().shape == (g.dim,)


def test_default_layout_is_khatri_rao_and_kronecker_stays_available():
    default = make_sketch(1280, 384, 128, sketch_dim=512)
    assert isinstance(default, KhatriRaoSketch) and default.dim == 512
    old = make_sketch(1280, 384, 128, sketch_dim=512, layout="kronecker")
    assert isinstance(old, EndPointSketch) and old.dim == 493  # the earlier layout's realised dimension
    assert isinstance(make_sketch(1280, 384, 128, sketch_dim=512, layout="tensorsketch"), TensorSketch)
    assert isinstance(make_sketch(7, 5, 4, sketch_dim=10_000), IdentitySketch)
    with pytest.raises(ValueError, match="layout"):
        make_sketch(7, 5, 4, sketch_dim=8, layout="fft", exact_when_small=False)
    with pytest.raises(ValueError, match="kind"):
        make_sketch(7, 5, 4, sketch_dim=8, kind="uniform", exact_when_small=False)
    with pytest.raises(ValueError, match="sketch_dim"):
        make_sketch(7, 5, 4, sketch_dim=0, exact_when_small=False)


@pytest.mark.parametrize("layout, kind", ALL)
@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True), (True, True)])
def test_factored_application_equals_the_dense_matrix(layout, kind, bias):
    """``sketch_grads(g) = P g.flatten()`` and ``sketch_direction(v) = P v.flatten()`` for the matrix ``P`` whose rows
    are ``transpose`` of unit vectors: the three methods are one linear map."""
    d_v, d_t, e = 9, 6, 5
    sk = make_sketch(d_v, d_t, e, sketch_dim=23, image_bias=bias[0], text_bias=bias[1], kind=kind, seed=4,
                     layout=layout, exact_when_small=False)  # fmt: skip
    p = _dense(sk)
    g = _grads(11, d_v, d_t, e, *bias, scale=3.0)
    torch.testing.assert_close(sk.sketch_grads(g), g.flatten() @ p.T, rtol=0, atol=1e-10)
    v = _direction(d_v, d_t, e, *bias)
    torch.testing.assert_close(sk.sketch_direction(v), p @ v.flatten(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("bias", [(False, False), (True, True)])
def test_khatri_rao_rows_are_the_documented_face_splitting_product(kind, bias):
    """Row ``j`` of ``P`` is ``(a_j (x) b_j, a'_j (x) b'_j, c_j)`` (bias = the last ``h``-entry of ``a``), scaled so
    the entries have variance ``1/k``; Rademacher entries are ``+-1/sqrt(k)``."""
    d_v, d_t, e, k = 6, 4, 3, 17
    sk = KhatriRaoSketch(d_v, d_t, e, sketch_dim=k, image_bias=bias[0], text_bias=bias[1], kind=kind, seed=2)
    rows = []
    for j in range(k):
        av, bv, at, bt = sk.image_h[j], sk.image_d[j], sk.text_h[j], sk.text_d[j]
        parts = [torch.outer(av[:d_v], bv).flatten(), torch.outer(at[:d_t], bt).flatten(), sk.scale[j : j + 1]]
        parts += [av[d_v] * bv] if bias[0] else []
        parts += [at[d_t] * bt] if bias[1] else []
        rows.append(torch.cat(parts))
    expected = torch.stack(rows)
    torch.testing.assert_close(_dense(sk), expected, rtol=0, atol=1e-12)
    if kind == "rademacher":
        torch.testing.assert_close(expected.abs(), torch.full_like(expected, k**-0.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout, kind", ALL)
@pytest.mark.parametrize("bias", [(False, False), (True, True)])
def test_adjointness(layout, kind, bias):
    """``<P g, z> = <g, P^T z>`` for factored gradients and ``<P v, z> = <v, P^T z>`` for dense directions."""
    d_v, d_t, e = 40, 24, 16
    sk = make_sketch(d_v, d_t, e, sketch_dim=64, image_bias=bias[0], text_bias=bias[1], kind=kind, seed=9,
                     layout=layout, exact_when_small=False)  # fmt: skip
    z = torch.randn(sk.dim, generator=torch.Generator().manual_seed(3), dtype=D64)
    back = sk.transpose(z)
    g = _grads(8, d_v, d_t, e, *bias)
    torch.testing.assert_close(sk.sketch_grads(g) @ z, g.dot(back), rtol=1e-10, atol=1e-10)
    v = _direction(d_v, d_t, e, *bias)
    torch.testing.assert_close(sk.sketch_direction(v) @ z, v.dot(back), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout, kind", ALL)
def test_expected_gram_is_identity(layout, kind):
    """The average of ``P^T P`` over seeds approaches ``I`` (every block, the scale and the biases)."""
    d_v, d_t, e, k, seeds = 3, 2, 2, 8, 1500
    total = 0.0
    for seed in range(seeds):
        p = _dense(make_sketch(d_v, d_t, e, sketch_dim=k, image_bias=True, text_bias=True, kind=kind, seed=seed,
                               layout=layout, exact_when_small=False))  # fmt: skip
        total = total + p.T @ p
    mean = total / seeds
    dim = mean.shape[0]
    assert dim == d_v * e + d_t * e + 1 + 2 * e
    # Entry-wise sd of the mean is at most sqrt(8 / (k * seeds)) = 0.026 (Gaussian Khatri-Rao, the widest).
    assert (mean - torch.eye(dim, dtype=D64)).abs().max() < 0.15


@pytest.mark.parametrize("layout, kind", ALL)
def test_same_seed_same_sketch_different_seed_different(layout, kind):
    make = lambda seed: make_sketch(30, 20, 8, sketch_dim=50, kind=kind, seed=seed, layout=layout,  # noqa: E731
                                    image_bias=True, exact_when_small=False)  # fmt: skip
    g = _grads(5, 30, 20, 8, image_bias=True)
    a, b, c = make(7).sketch_grads(g), make(7).sketch_grads(g), make(8).sketch_grads(g)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3 * a.abs().max()


def test_gaussian_and_rademacher_khatri_rao_differ():
    g = _grads(5, 30, 20, 8)
    kw = dict(sketch_dim=50, seed=0, exact_when_small=False)
    gauss = make_sketch(30, 20, 8, kind="gaussian", **kw).sketch_grads(g)
    rad = make_sketch(30, 20, 8, kind="rademacher", **kw).sketch_grads(g)
    assert (gauss - rad).abs().max() > 1e-3 * gauss.abs().max()


@pytest.mark.parametrize("layout", EXACT_LAYOUTS)
def test_sketch_grads_do_not_depend_on_chunking(layout, monkeypatch):
    sk = make_sketch(40, 24, 16, sketch_dim=32, image_bias=True, layout=layout, exact_when_small=False)
    g = _grads(37, 40, 24, 16, image_bias=True)
    whole = sk.sketch_grads(g)
    monkeypatch.setattr(sketch_module, "_CHUNK_ELEMENTS", 5 * 32)  # 5 samples per chunk, the last one short
    torch.testing.assert_close(sk.sketch_grads(g), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", EXACT_LAYOUTS)
def test_float32_sketch_stays_float32_and_close_to_float64(layout):
    kw = dict(sketch_dim=64, seed=1, layout=layout, exact_when_small=False)
    g = _grads(6, 40, 24, 16)
    s64 = make_sketch(40, 24, 16, **kw).sketch_grads(g)
    s32 = make_sketch(40, 24, 16, dtype=torch.float32, **kw).sketch_grads(g)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=1e-4 * float(s64.abs().max()))


def _feature_like_pairs(n: int, d_v: int, d_t: int, e: int, cos_h: float, seed: int):
    """Rank-one gradient pairs whose pre-projection features share a direction (cosine ~ ``cos_h`` within a pair,
    as CLIP features do: far from isotropic); the embedding-side factors are independent isotropic vectors."""
    g = torch.Generator().manual_seed(seed)

    def features(d):
        mean = torch.randn(d, generator=g, dtype=D64)
        noise = lambda: torch.randn(n, d, generator=g, dtype=D64) * ((1 - cos_h) / cos_h) ** 0.5  # noqa: E731
        return mean + noise(), mean + noise()

    (hv, hv2), (ht, ht2) = features(d_v), features(d_t)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=D64)  # noqa: E731
    x = EndPointGrads(hv, rnd(n, e), ht, rnd(n, e), rnd(n))
    y = EndPointGrads(hv2, rnd(n, e), ht2, rnd(n, e), rnd(n))
    return x, y


@pytest.mark.parametrize("case", ["aligned features", "norms"])
def test_khatri_rao_inner_product_variance_far_below_kronecker_at_the_benchmark_shape(case):
    """At ``d_v=1280, d_t=384, e=128``, ``k=512`` the Kronecker layout has only ``k_d = 6`` embedding-side rows per
    block, so its relative variance is ~``c_h^2 / k_d`` (aligned features) or ~``2/k_h + 2/k_d`` (norms); the
    Khatri-Rao layout spends the whole budget on every coordinate: ~``(1 + 2 c_h^2)/k`` and ``<= 8/k``."""
    d_v, d_t, e, k = 1280, 384, 128, 512
    # Data from a stream other than the sketches' (seeds 0..5), so no sketch row copies a feature direction.
    x, y = _feature_like_pairs(48, d_v, d_t, e, cos_h=0.8, seed=1000)
    if case == "norms":
        y = x
    exact = (x.flatten() * y.flatten()).sum(1)
    scale = x.sq_norms().sqrt() * y.sq_norms().sqrt()
    variance = {}
    for layout in ("khatri_rao", "kronecker"):
        errors = []
        for seed in range(6):
            sk = make_sketch(d_v, d_t, e, sketch_dim=k, seed=seed, layout=layout)
            estimate = (sk.sketch_grads(x) * sk.sketch_grads(y)).sum(1)
            errors.append((estimate - exact) / scale)
        variance[layout] = float(torch.cat(errors).square().mean())
    # Expected ratio ~25x in both cases; the bound keeps a 5x margin. Khatri-Rao itself is within 2x of 8/k.
    assert variance["khatri_rao"] < variance["kronecker"] / 5, variance
    assert variance["khatri_rao"] < 2 * 8 / k, variance


def test_solve_direction_threads_the_layout():
    g = _grads(40, 30, 20, 8)
    weights = torch.full((40,), 1 / 40, dtype=D64)
    u = g.weighted_sum(weights)
    kw = dict(solver="sketch", sketch_dim=50, exact_when_small=False)
    _, _, k_default = solve_direction(g, weights, u, **kw)
    _, _, k_kron = solve_direction(g, weights, u, sketch_layout="kronecker", **kw)
    v_ts, _, k_ts = solve_direction(g, weights, u, sketch_layout="tensorsketch", **kw)
    assert (k_default, k_ts) == (50, 50) and k_kron < 50
    assert torch.isfinite(v_ts.flatten()).all()
