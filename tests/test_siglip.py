"""SigLIP's sigmoid loss (docs/methods.md, SigLIP's sigmoid loss): an end point with a logit bias is scored with it
everywhere InfoNCE is used for one without.

The reference below is written from the spec, not from the implementation: for pair ``i`` with
``x = normalize(W_v^T h_v + b_v)``, ``y = normalize(W_t^T h_t + b_t)``, ``s = exp(logit_scale)``, logit bias ``c``,

    z_0 = s x.y + c,  a_j = s x.Y_B[j] + c,  b_j = s X_B[j].y + c,
    l_i = softplus(-z_0) + 1/2 sum_j softplus(a_j) + 1/2 sum_j softplus(b_j)      (excluded j dropped),

over a flat theta laid out as image_proj, text_proj, logit_scale, image_bias, text_bias, logit_bias; gradients and
Jacobians by ``torch.func``.
"""

from __future__ import annotations

import functools
import itertools

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from scipy.stats import spearmanr
from torch.func import grad, jacrev, vmap

from lightning_chips.adapters import EndPoint, resolve_adapter
from lightning_chips.features import PairFeatures
from lightning_chips.functional import (
    EndPointGrads,
    adapt_endpoint,
    bank_loss,
    bank_stats,
    chips_prepare,
    chips_scores,
    curvature_atoms,
    endpoint_parameter_names,
    endpoint_per_sample_grads,
    full_parameter_bank,
    full_parameter_grads,
    full_parameter_influence,
    grad_dot,
    negclip_loss,
    negsiglip_loss,
    select_parameters,
    tracin_scores,
    trak_scores,
)
from lightning_chips.functional.bank import make_bank
from lightning_chips.functional.quality import sigmoid_threshold
from lightning_chips.functional.sketch import make_sketch
from lightning_chips.scoring import CHIPS, TRAK, CLIPScore, Dot, NegCLIPLoss, RoundContext, TracIn
from lightning_chips.scoring.chips import ROBUST_COMPONENTS

DT = torch.float64
BIASES = [(False, False), (True, False), (False, True), (True, True)]


# -- independent reference ------------------------------------------------------------------------------------------
def _endpoint(d_v=5, d_t=4, e=3, image_bias=False, text_bias=False, logit_scale=1.2, logit_bias=-3.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    return EndPoint(
        r(d_v, e) / d_v**0.5, r(d_t, e) / d_t**0.5, torch.tensor(logit_scale, dtype=DT),
        r(e) * 0.3 if image_bias else None, r(e) * 0.3 if text_bias else None, torch.tensor(logit_bias, dtype=DT),
    )  # fmt: skip


def _layout(ep: EndPoint) -> list[tuple[str, tuple[int, ...]]]:
    names = ["image_proj", "text_proj", "logit_scale", "image_bias", "text_bias", "logit_bias"]
    return [(n, tuple(getattr(ep, n).shape)) for n in names if getattr(ep, n) is not None]


def _theta(ep: EndPoint) -> torch.Tensor:
    return torch.cat([getattr(ep, n).detach().reshape(-1) for n, _ in _layout(ep)])


def _unflat(theta, layout) -> dict[str, torch.Tensor]:
    out, k = {}, 0
    for name, shape in layout:
        n = int(torch.Size(shape).numel())
        out[name] = theta[k : k + n].reshape(shape)
        k += n
    return out


def _ref_logits(theta, h_v, h_t, bank_x, bank_y, excl, layout):
    """``(z_0, a, b)`` of ONE sample; excluded bank entries are ``-inf``."""
    P = _unflat(theta, layout)
    e_v, e_t = h_v @ P["image_proj"], h_t @ P["text_proj"]
    e_v = e_v + P["image_bias"] if "image_bias" in P else e_v
    e_t = e_t + P["text_bias"] if "text_bias" in P else e_t
    x, y = e_v / e_v.norm(), e_t / e_t.norm()
    s, c = torch.exp(P["logit_scale"]), P["logit_bias"]
    z0, a, b = s * (x * y).sum() + c, s * (bank_y @ x) + c, s * (bank_x @ y) + c
    if excl is not None:
        a = torch.where(excl, torch.full_like(a, float("-inf")), a)
        b = torch.where(excl, torch.full_like(b, float("-inf")), b)
    return z0, a, b


def _ref_loss_one(theta, h_v, h_t, bank_x, bank_y, excl, layout):
    z0, a, b = _ref_logits(theta, h_v, h_t, bank_x, bank_y, excl, layout)
    return F.softplus(-z0) + 0.5 * F.softplus(a).sum() + 0.5 * F.softplus(b).sum()


def _ref_grads(ep, h_v, h_t, bank_x, bank_y, exclude=None):
    f = functools.partial(_ref_loss_one, layout=_layout(ep))
    ex = None if exclude is None else 0
    return vmap(grad(f), in_dims=(None, 0, 0, None, None, ex))(_theta(ep), h_v, h_t, bank_x, bank_y, exclude)


def _ref_losses(ep, h_v, h_t, bank_x, bank_y, exclude=None):
    f = functools.partial(_ref_loss_one, layout=_layout(ep))
    ex = None if exclude is None else 0
    return vmap(f, in_dims=(None, 0, 0, None, None, ex))(_theta(ep), h_v, h_t, bank_x, bank_y, exclude)


def _data(ep, n=6, m=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    h_v, h_t = torch.randn(n, ep.image_dim, generator=g, dtype=DT), torch.randn(n, ep.text_dim, generator=g, dtype=DT)
    bank_x = F.normalize(torch.randn(m, ep.embed_dim, generator=g, dtype=DT), dim=1)
    bank_y = F.normalize(torch.randn(m, ep.embed_dim, generator=g, dtype=DT), dim=1)
    exclude = torch.rand(n, m, generator=g) < 0.3
    exclude[0] = False  # nothing excluded
    exclude[1] = True  # every negative excluded: only the positive term is left
    return h_v, h_t, bank_x, bank_y, exclude


# -- 1. closed-form gradients == autograd --------------------------------------------------------------------------
@pytest.mark.parametrize("logit_scale, logit_bias", [(0.0, 0.0), (1.2, -3.0), (2.3, -10.0), (-1.0, 2.5)])
@pytest.mark.parametrize("image_bias, text_bias", BIASES)
def test_sigmoid_grads_equal_autograd(image_bias, text_bias, logit_scale, logit_bias):
    ep = _endpoint(image_bias=image_bias, text_bias=text_bias, logit_scale=logit_scale, logit_bias=logit_bias)
    assert ep.loss == "sigmoid"
    h_v, h_t, bank_x, bank_y, exclude = _data(ep)
    for ex in (None, exclude):
        g = endpoint_per_sample_grads(h_v, h_t, ep, bank_x, bank_y, exclude=ex)
        ref = _ref_grads(ep, h_v, h_t, bank_x, bank_y, ex)
        assert g.bias is not None and g.dim == ep.num_parameters == ref.shape[1]
        flat = g.flatten()
        assert (flat - ref).abs().max() < 1e-10, (flat - ref).abs().max()
        # Per block, so the logit-bias column (last) and the scale cannot hide under the heads.
        k = 0
        for name, shape in _layout(ep):
            n = int(torch.Size(shape).numel())
            assert ref[:, k : k + n].abs().max() > 0, name
            assert (flat[:, k : k + n] - ref[:, k : k + n]).abs().max() < 1e-10, name
            k += n
        # Autograd of the implementation's own bank_loss agrees too (the loss the gradients are of).
        assert (flat - _bank_loss_grads(ep, h_v, h_t, bank_x, bank_y, ex)).abs().max() < 1e-10


def _bank_loss_grads(ep, h_v, h_t, bank_x, bank_y, exclude):
    names = [n for n, _ in _layout(ep)]

    def loss(params, hv, ht, x):
        endpoint = EndPoint(**dict(zip(names, params, strict=True)))
        return bank_loss(hv[None], ht[None], endpoint, bank_x, bank_y, exclude=None if x is None else x[None])[0]

    params = tuple(getattr(ep, n) for n in names)
    auto = vmap(grad(loss), in_dims=(None, 0, 0, None if exclude is None else 0))(params, h_v, h_t, exclude)
    return torch.cat([t.reshape(len(h_v), -1) for t in auto], dim=1)


# -- 2. the loss: its formula and open_clip's SigLipLoss ------------------------------------------------------------
def test_sigmoid_bank_loss_equals_its_formula():
    ep = _endpoint(image_bias=True, text_bias=True)
    h_v, h_t, bank_x, bank_y, exclude = _data(ep)
    stats = bank_stats(h_v, h_t, ep, bank_x, bank_y, exclude=exclude)
    assert stats.loss_kind == "sigmoid"
    torch.testing.assert_close(stats.loss, _ref_losses(ep, h_v, h_t, bank_x, bank_y, exclude), rtol=1e-12, atol=1e-12)
    # Written out once more with plain tensors: positive term, half rows, half columns.
    x, y, s, c = ep.embed_image(h_v), ep.embed_text(h_t), ep.scale(), ep.logit_bias
    keep = (~exclude).to(DT)
    expected = (
        F.softplus(-(s * (x * y).sum(1) + c))
        + 0.5 * (F.softplus(s * x @ bank_y.T + c) * keep).sum(1)
        + 0.5 * (F.softplus(s * y @ bank_x.T + c) * keep).sum(1)
    )
    torch.testing.assert_close(bank_loss(h_v, h_t, ep, bank_x, bank_y, exclude=exclude), expected, rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    torch.testing.assert_close(stats.p, torch.sigmoid(stats.logits_i2t), rtol=0, atol=0)
    assert bool((stats.p[:, 1:][exclude] == 0).all())
    torch.testing.assert_close(stats.p_corr(), torch.sigmoid(s * (x * y).sum(1) + c))


@pytest.mark.parametrize("logit_scale, logit_bias", [(2.3, -10.0), (0.5, 1.0)])
def test_per_sample_losses_of_a_batch_average_to_siglip_loss(logit_scale, logit_bias):
    """With the rest of the batch as the bank, mean_i l_i = open_clip's SigLipLoss, and the summed per-sample
    gradients' logit-scale and logit-bias coordinates are exactly the batch loss's (n SigLipLoss)."""
    ep = _endpoint(d_v=6, d_t=5, e=4, image_bias=True, logit_scale=logit_scale, logit_bias=logit_bias)
    n = 9
    g = torch.Generator().manual_seed(3)
    h_v, h_t = torch.randn(n, 6, generator=g, dtype=DT), torch.randn(n, 5, generator=g, dtype=DT)
    x, y = ep.embed_image(h_v), ep.embed_text(h_t)
    own = torch.eye(n, dtype=torch.bool)
    losses = bank_loss(h_v, h_t, ep, x, y, exclude=own)
    scale = ep.logit_scale.clone().requires_grad_(True)
    bias = ep.logit_bias.clone().requires_grad_(True)
    batch = SigLipLoss()(x, y, scale.exp(), bias)
    torch.testing.assert_close(losses.mean(), batch.detach(), rtol=1e-12, atol=1e-12)
    (n * batch).backward()
    grads = endpoint_per_sample_grads(h_v, h_t, ep, x, y, exclude=own)
    torch.testing.assert_close(grads.scale.sum(), scale.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads.bias.sum(), bias.grad, rtol=1e-12, atol=1e-12)


def test_an_open_clip_siglip_shaped_model_averages_to_its_siglip_loss(tiny_vit_config):
    """A tiny open_clip CLIP built with a logit bias (SigLIP's init, -10): its adapter's end point carries the bias,
    and its per-sample losses average to SigLipLoss of its own forward pass."""
    model = open_clip.CLIP(**tiny_vit_config, init_logit_bias=-10.0).double().eval()
    adapter = resolve_adapter(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g, dtype=DT)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(["a cat", "a dog", "x", "", "red", "a map"])
    with torch.no_grad():
        h_v, h_t = adapter.image_features(images), adapter.text_features(tokens)
        ep = adapter.endpoint().detach()
        assert ep.loss == "sigmoid" and float(ep.logit_bias) == -10.0
        x, y = ep.embed_image(h_v), ep.embed_text(h_t)
        torch.testing.assert_close(x, F.normalize(model.encode_image(images), dim=-1))
        image_features, text_features, scale, bias = model(images, tokens)  # normalised features, exp'd scale
        expected = SigLipLoss()(image_features, text_features, scale, bias)
    losses = bank_loss(h_v, h_t, ep, x, y, exclude=torch.eye(6, dtype=torch.bool))
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-10, atol=1e-12)


# -- the factored algebra and the sketches carry the logit-bias coordinate -----------------------------------------
@pytest.mark.parametrize("image_bias, text_bias", BIASES)
def test_factored_algebra_with_a_logit_bias_matches_dense(image_bias, text_bias):
    ep = _endpoint(image_bias=image_bias, text_bias=text_bias)
    h_v, h_t, bank_x, bank_y, exclude = _data(ep, n=7)
    g = endpoint_per_sample_grads(h_v, h_t, ep, bank_x, bank_y, exclude=exclude)
    g2 = endpoint_per_sample_grads(h_v[:4] + 1.0, h_t[:4], ep, bank_x, bank_y)
    G, G2 = g.flatten(), g2.flatten()
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(g.gram(), G @ G.T, **tol)
    torch.testing.assert_close(g.gram(g2), G @ G2.T, **tol)
    torch.testing.assert_close(g.sq_norms(), (G * G).sum(1), **tol)
    w = torch.linspace(-1, 2, 7, dtype=DT)
    ws = g.weighted_sum(w)
    assert ws.logit_bias is not None and ws.logit_bias.dim() == 0
    torch.testing.assert_close(ws.flatten(), w @ G, **tol)
    torch.testing.assert_close(g.dot(ws), G @ (w @ G), **tol)
    torch.testing.assert_close((ws - 2.0 * ws).flatten(), -(w @ G), **tol)
    idx = torch.tensor([5, 0, 3])
    torch.testing.assert_close(EndPointGrads.cat([g.index(idx), g2]).flatten(), torch.cat([G[idx], G2]), rtol=0,
                               atol=0)  # fmt: skip


@pytest.mark.parametrize("layout", ["khatri_rao", "kronecker", "tensorsketch"])
def test_sketches_carry_the_logit_bias_coordinate(layout):
    ep = _endpoint(image_bias=True)
    h_v, h_t, bank_x, bank_y, _ = _data(ep, n=5)
    g = endpoint_per_sample_grads(h_v, h_t, ep, bank_x, bank_y)
    kw = dict(sketch_dim=13, image_bias=True, kind="gaussian", seed=4, layout=layout, exact_when_small=False)
    sk = make_sketch(ep.image_dim, ep.text_dim, ep.embed_dim, logit_bias=True, **kw)
    eye = torch.eye(sk.dim, dtype=DT)
    P = torch.stack([sk.transpose(eye[j]).flatten() for j in range(sk.dim)])  # [k, dim(theta)]
    assert P.shape[1] == ep.num_parameters
    assert P[:, -1].abs().max() > 0  # the logit bias has its own random coordinates
    torch.testing.assert_close(sk.sketch_grads(g), g.flatten() @ P.T, rtol=1e-10, atol=1e-12)
    v = g.weighted_sum(torch.ones(5, dtype=DT))
    torch.testing.assert_close(sk.sketch_direction(v), P @ v.flatten(), rtol=1e-10, atol=1e-12)
    # Without a logit bias the same seed draws the same sketch as before the coordinate existed.
    plain = make_sketch(ep.image_dim, ep.text_dim, ep.embed_dim, **kw)
    P0 = torch.stack([plain.transpose(torch.eye(plain.dim, dtype=DT)[j]).flatten() for j in range(plain.dim)])
    if layout != "kronecker":  # the Kronecker grid gives one coordinate of its budget to the bias
        torch.testing.assert_close(P[:, :-1], P0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="logit-bias coordinate"):
        plain.sketch_grads(g)
    identity = make_sketch(ep.image_dim, ep.text_dim, ep.embed_dim, sketch_dim=None, image_bias=True, logit_bias=True)
    assert identity.dim == ep.num_parameters
    torch.testing.assert_close(identity.transpose(identity.sketch_direction(v)).flatten(), v.flatten(), rtol=0, atol=0)


# -- 3. CHIPS: the sigmoid loss's curvature ------------------------------------------------------------------------
def _problem(n=30, t=5, d_v=4, d_t=3, e=3, bias=True, seed=0, logit_bias=-2.0):
    g = torch.Generator().manual_seed(seed)
    ep = _endpoint(d_v, d_t, e, image_bias=bias, text_bias=bias, logit_scale=1.5, logit_bias=logit_bias, seed=seed)
    shift_v, shift_t = torch.randn(d_v, generator=g, dtype=DT), torch.randn(d_t, generator=g, dtype=DT)
    pool_v, pool_t = torch.randn(n, d_v, generator=g, dtype=DT), torch.randn(n, d_t, generator=g, dtype=DT)
    pool_v[: n // 5] += shift_v
    pool_t[: n // 5] += shift_t
    return pool_v, pool_t, torch.randn(t, d_v, generator=g, dtype=DT) + shift_v, \
        torch.randn(t, d_t, generator=g, dtype=DT) + shift_t, ep  # fmt: skip


def _logit_jacobians(ep, h_v, h_t, bank_x, bank_y):
    """Per sample: the logits ``[1 + 2M]`` (positive, image->text bank, text->image bank) and their Jacobians
    ``[1 + 2M, dim(theta)]`` w.r.t. theta, by jacrev of the reference logits."""
    layout = _layout(ep)

    def logits(theta, hv, ht):
        z0, a, b = _ref_logits(theta, hv, ht, bank_x, bank_y, None, layout)
        return torch.cat([z0[None], a, b])

    theta = _theta(ep)
    z = vmap(logits, in_dims=(None, 0, 0))(theta, h_v, h_t)
    J = vmap(jacrev(logits), in_dims=(None, 0, 0))(theta, h_v, h_t)
    return z, J


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_kernel_solve_equals_a_dense_solve_of_the_sigmoid_ggn_built_from_autograd(alpha):
    """M = (1 - alpha) Phi_pos + alpha Phi_neg + lambda I with Phi_pos = mean_r v(z_0) J_0 J_0^T and Phi_neg the
    drawn bank logits' J_j J_j^T at weight V / (2 K R), from autograd Jacobians and v = sigma (1 - sigma)."""
    pool_v, pool_t, target_v, target_t, ep = _problem()
    n, k, lam, seed = len(pool_v), 3, 0.05, 2
    # The whole pool is the bank and the curvature sample.
    kwargs = dict(alpha=alpha, bank_size=10_000, curvature_samples=10_000, negatives_per_sample=k, damping=lam,
                  seed=seed)  # fmt: skip
    kernel = chips_scores(pool_v, pool_t, target_v, target_t, ep, solver="kernel", **kwargs)
    dense_path = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=None, **kwargs)

    bank_x, bank_y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    own = torch.eye(n, dtype=torch.bool)
    z, J = _logit_jacobians(ep, pool_v, pool_t, bank_x, bank_y)
    v = torch.sigmoid(z) * torch.sigmoid(-z)  # sigma (1 - sigma) per logit
    excluded = torch.cat([torch.zeros(n, 1, dtype=torch.bool), own, own], dim=1)  # a pair is not its own negative
    v = v.masked_fill(excluded, 0.0)
    dim = ep.num_parameters
    M = (1 - alpha) / n * torch.einsum("r,ri,rj->ij", v[:, 0], J[:, 0], J[:, 0])
    if alpha > 0:
        # The drawn negatives: the atoms curvature_atoms builds with the generator chips_prepare uses.
        bank = make_bank(ep, pool_v, pool_t, torch.arange(n), bank_size=10_000, seed=seed)
        stats = bank.stats(pool_v, pool_t, ep, torch.arange(n))
        atoms, weights = curvature_atoms(pool_v, pool_t, stats, bank.image, bank.text, ep, alpha=alpha,
                                         negatives_per_sample=k,
                                         generator=torch.Generator().manual_seed(seed + 2))  # fmt: skip
        A = atoms.flatten()
        assert len(A) == n + 2 * n * k
        torch.testing.assert_close(A[:n], J[:, 0], rtol=1e-10, atol=1e-12)  # positive atoms: J_0
        torch.testing.assert_close(weights[:n], (1 - alpha) * v[:, 0] / n, rtol=1e-10, atol=1e-15)
        for side, cols in ((0, slice(1, 1 + n)), (1, slice(1 + n, 1 + 2 * n))):
            for r in range(n):
                V = v[r, cols].sum()
                for i in range(k):
                    row = n + side * n * k + r * k + i
                    # the atom is the Jacobian of one bank logit of sample r in this direction (never itself)
                    dist = (J[r, cols] - A[row]).abs().amax(1)
                    j = int(dist.argmin())
                    assert dist[j] < 1e-10 and j != r, (side, r, i, float(dist[j]))
                    torch.testing.assert_close(weights[row], alpha * V / (2 * k * n), rtol=1e-10, atol=1e-15)
                    M = M + alpha * V / (2 * k * n) * torch.outer(J[r, cols][j], J[r, cols][j])
    g = _ref_grads(ep, pool_v, pool_t, bank_x, bank_y, own)
    u = _ref_grads(ep, target_v, target_t, bank_x, bank_y).mean(0)
    expected = g @ torch.linalg.solve(M + lam * torch.eye(dim, dtype=DT), u)
    err = (kernel.alignment - expected).abs().max() / expected.abs().max()
    assert err < 1e-9, float(err)
    torch.testing.assert_close(dense_path.alignment, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def test_sampled_negative_curvature_is_unbiased():
    """The importance-sampled Phi_neg averages to the exact sum over the bank, 1/R sum_r 1/2 sum_j v_j J_j J_j^T
    (both directions), as the number of draws grows."""
    pool_v, pool_t, _, _, ep = _problem(n=12, bias=False)
    n, k = len(pool_v), 4000
    bank = make_bank(ep, pool_v, pool_t, torch.arange(n), bank_size=10_000, seed=0)
    stats = bank.stats(pool_v, pool_t, ep, torch.arange(n))
    atoms, weights = curvature_atoms(pool_v, pool_t, stats, bank.image, bank.text, ep, alpha=1.0,
                                     negatives_per_sample=k, generator=torch.Generator().manual_seed(0))  # fmt: skip
    A = atoms.flatten()[n:]
    sampled = A.T @ (A * weights[n:, None])
    z, J = _logit_jacobians(ep, pool_v, pool_t, bank.image, bank.text)
    v = (torch.sigmoid(z) * torch.sigmoid(-z))[:, 1:]
    own = torch.eye(n, dtype=torch.bool)
    v = v.masked_fill(torch.cat([own, own], dim=1), 0.0)
    exact = 0.5 / n * torch.einsum("rj,rja,rjb->ab", v, J[:, 1:], J[:, 1:])
    err = (sampled - exact).norm() / exact.norm()
    assert err < 0.03, float(err)
    torch.testing.assert_close(torch.trace(sampled), torch.trace(exact), rtol=0.03, atol=0)


def _sketch_problem():
    g = torch.Generator().manual_seed(0)
    n, d_v, d_t, e = 1000, 10, 6, 30
    ep = EndPoint(torch.randn(d_v, e, generator=g, dtype=DT) / d_v**0.5,
                  torch.randn(d_t, e, generator=g, dtype=DT) / d_t**0.5, torch.tensor(2.3, dtype=DT))  # fmt: skip
    shift_v, shift_t = torch.randn(d_v, generator=g, dtype=DT), torch.randn(d_t, generator=g, dtype=DT)
    pool_v, pool_t = torch.randn(n, d_v, generator=g, dtype=DT), torch.randn(n, d_t, generator=g, dtype=DT)
    pool_v[: n // 5] += shift_v
    pool_t[: n // 5] += shift_t
    target_v = torch.randn(12, d_v, generator=g, dtype=DT) + shift_v
    target_t = torch.randn(12, d_t, generator=g, dtype=DT) + shift_t
    return pool_v, pool_t, target_v, target_t, ep


SKETCH_TOLERANCE = 0.05
"""How much lower the sigmoid sketch's Spearman with its exact solve may be than the InfoNCE sketch's."""


def test_sigmoid_sketch_ranks_like_its_exact_solve_as_well_as_the_infonce_sketch():
    """Same features and heads; the sigmoid end point adds a logit bias. Spearman of sketched vs exact (dense)
    alignment per loss, at k = dim(theta) / 2 and 2 dim(theta)."""
    pool_v, pool_t, target_v, target_t, infonce = _sketch_problem()
    bias = torch.tensor(-5.0, dtype=DT)
    sigmoid = EndPoint(infonce.image_proj, infonce.text_proj, infonce.logit_scale, logit_bias=bias)
    kwargs = dict(bank_size=256, curvature_samples=400)
    rhos = {}
    for name, ep in (("infonce", infonce), ("sigmoid", sigmoid)):
        exact = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=None, **kwargs).alignment
        dim = ep.num_parameters
        for k in (dim // 2, 2 * dim):
            sketched = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=k, exact_when_small=False,
                                    **kwargs).alignment  # fmt: skip
            rhos[name, k // dim] = spearmanr(exact.numpy(), sketched.numpy())[0]
    for k in (0, 2):
        assert rhos["sigmoid", k] >= rhos["infonce", k] - SKETCH_TOLERANCE, rhos
    assert rhos["sigmoid", 2] >= 0.99, rhos


def test_sigmoid_learnability_uses_the_pair_probability():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=40)
    out = chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=None, bank_size=15, seed=1)
    state = chips_prepare(ep, target_v, target_t, pool_v, pool_t, sketch_dim=None, bank_size=15, seed=1)
    x, y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    s, c = ep.scale(), ep.logit_bias
    a = torch.cat([s * (x * y).sum(1, keepdim=True), s * x @ state.bank.text.T], 1) + c
    b = torch.cat([s * (x * y).sum(1, keepdim=True), s * y @ state.bank.image.T], 1) + c
    own = torch.arange(40)[:, None] == state.bank.ids[None, :]
    a[:, 1:][own], b[:, 1:][own] = float("-inf"), float("-inf")
    margin = 0.5 * ((a[:, 0] - a[:, 1:].max(1).values) + (b[:, 0] - b[:, 1:].max(1).values))
    torch.testing.assert_close(out.learnability, (1 - torch.sigmoid(a[:, 0])) * (1 + torch.sigmoid(-margin)))
    mu_x = F.normalize(ep.embed_image(target_v).mean(0), dim=0)
    mu_y = F.normalize(ep.embed_text(target_t).mean(0), dim=0)
    torch.testing.assert_close(out.relevance, torch.sigmoid(0.5 * x @ mu_x + 0.5 * y @ mu_y))  # loss-free


def test_reference_adaptation_trains_with_the_sigmoid_loss():
    """adapt_endpoint's first Adam step moves every coordinate against the sign of the gradient of SigLIP's loss of
    the target batch (targets live on both sides, the bank as constant extra negatives), the logit bias included."""
    pool_v, pool_t, target_v, target_t, ep = _problem(n=20)
    lr, t, layout = 1e-3, len(target_v), _layout(ep)
    bank_x, bank_y = ep.embed_image(pool_v), ep.embed_text(pool_t)

    def batch_loss(theta):
        P = _unflat(theta, layout)
        x = F.normalize(target_v @ P["image_proj"] + P["image_bias"], dim=1)
        y = F.normalize(target_t @ P["text_proj"] + P["text_bias"], dim=1)
        s, c = P["logit_scale"].exp(), P["logit_bias"]
        labels = -torch.ones(t, t + len(pool_v), dtype=DT)
        labels[:, :t] += 2 * torch.eye(t, dtype=DT)
        rows = F.softplus(-labels * (s * x @ torch.cat([y, bank_y]).T + c)).sum(1)
        cols = F.softplus(-labels * (s * y @ torch.cat([x, bank_x]).T + c)).sum(1)
        return (0.5 * (rows + cols)).mean()

    gr = grad(batch_loss)(_theta(ep))
    ref = adapt_endpoint(ep, target_v, target_t, pool_v, pool_t, steps=1, lr=lr)
    assert ref.logit_bias is not None and ref.logit_bias != ep.logit_bias
    step = _theta(ref) - _theta(ep)
    big = gr.abs() > 1e-6
    assert int(big.sum()) >= ep.num_parameters - 2
    torch.testing.assert_close(step[big], -lr * torch.sign(gr[big]), rtol=1e-4, atol=0)
    many = adapt_endpoint(ep, target_v, target_t, pool_v, pool_t, steps=40, lr=1e-2)
    assert batch_loss(_theta(many)) < batch_loss(_theta(ep))


# -- 4. influence baselines and negSigLIPLoss ---------------------------------------------------------------------
NANO = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 8, "layers": 1, "width": 8, "head_width": 4, "patch_size": 4},
    "text_cfg": {"context_length": 6, "vocab_size": 16, "width": 8, "heads": 2, "layers": 1},
}


def test_full_parameter_gradients_and_trak_of_a_siglip_model_equal_the_end_point_ones():
    """An open_clip CLIP with a logit bias, only its end point trainable: the full-parameter path (torch.func through
    the towers) differentiates the same sigmoid bank loss as the closed form, and TRAK uses Q = 1 - sigma(z_ii)."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**NANO, init_logit_bias=-3.0).double()
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    names = endpoint_parameter_names(model)
    assert "logit_bias" in names
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    adapter = resolve_adapter(model)
    g = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(30, 3, 8, 8, generator=g, dtype=DT), torch.randint(1, 16, (30, 6), generator=g)
    t_images, t_tokens = torch.randn(4, 3, 8, 8, generator=g, dtype=DT), torch.randint(1, 16, (4, 6), generator=g)
    ids = torch.arange(30)
    bank = full_parameter_bank(model, images, tokens, ids, bank_size=12, seed=3)
    full = full_parameter_grads(model, images, tokens, bank, ids, chunk_size=8)
    with torch.no_grad():
        h_v, h_t = adapter.image_features(images), adapter.text_features(tokens)
        t_v, t_t = adapter.image_features(t_images), adapter.text_features(t_tokens)
    ep = adapter.endpoint().detach()
    closed = bank.grads(h_v, h_t, ep, ids).flatten()  # image_proj, text_proj, logit_scale, logit_bias
    sizes = {n: p.numel() for n, p in select_parameters(model).items()}
    blocks, k = {}, 0
    for name, size in sizes.items():  # named_parameters order
        blocks[name], k = full[:, k : k + size], k + size
    reordered = torch.cat([blocks[n] for n in ("visual.proj", "text_projection", "logit_scale", "logit_bias")], dim=1)
    assert (reordered - closed).abs().max() < 1e-10
    kwargs = dict(bank_size=12, seed=3, train_samples=20, damping=0.1)
    trak = full_parameter_influence(model, images, tokens, t_images, t_tokens, method="trak", **kwargs)
    expected = trak_scores([ep], h_v, h_t, t_v, t_t, sketch_dim=None, **kwargs)
    torch.testing.assert_close(trak, expected, rtol=1e-8, atol=1e-12)


def test_dot_tracin_and_trak_use_the_sigmoid_loss():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=40)
    n, lam = len(pool_v), 0.03
    bank_x, bank_y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    own = torch.eye(n, dtype=torch.bool)
    g = _ref_grads(ep, pool_v, pool_t, bank_x, bank_y, own)  # bank = the whole pool, each pair not its own negative
    u = _ref_grads(ep, target_v, target_t, bank_x, bank_y).mean(0)
    common = dict(bank_size=10_000)
    dot = grad_dot(pool_v, pool_t, target_v, target_t, ep, **common)
    torch.testing.assert_close(dot, g @ u, rtol=1e-10, atol=1e-12)
    tracin = tracin_scores([(ep, 0.1), (ep, 0.3)], pool_v, pool_t, target_v, target_t, **common)
    torch.testing.assert_close(tracin, 0.4 * g @ u, rtol=1e-10, atol=1e-12)
    trak = trak_scores([ep], pool_v, pool_t, target_v, target_t, sketch_dim=None, damping=lam, train_samples=10_000,
                       **common)  # fmt: skip
    x, y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    q = 1 - torch.sigmoid(ep.scale() * (x * y).sum(1) + ep.logit_bias)  # 1 - p_corr, p_corr = sigma(z_ii)
    kernel = g @ torch.linalg.solve(g.T @ g + lam * torch.eye(g.shape[1], dtype=DT), u)
    torch.testing.assert_close(trak, kernel * q, rtol=1e-8, atol=1e-12)


def test_negsiglip_with_one_full_batch_is_minus_tau_times_the_per_sample_sigmoid_loss():
    ep = _endpoint(d_v=6, d_t=5, e=8, logit_scale=2.0, logit_bias=-4.0)
    g = torch.Generator().manual_seed(5)
    h_v, h_t = torch.randn(40, 6, generator=g, dtype=DT), torch.randn(40, 5, generator=g, dtype=DT)
    x, y = ep.embed_image(h_v), ep.embed_text(h_t)
    c0 = sigmoid_threshold(ep.logit_scale, ep.logit_bias)
    assert c0 == pytest.approx(4.0 / ep.scale().item())
    tau = 1.0 / ep.scale().item()  # the model's own logits
    score = negsiglip_loss(x, y, threshold=c0, temperature=tau, batch_size=64, repeats=1)
    per_sample = bank_loss(h_v, h_t, ep, x, y, exclude=torch.eye(40, dtype=torch.bool))
    torch.testing.assert_close(score, -tau * per_sample, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(-score.mean() / tau, SigLipLoss()(x, y, ep.scale(), ep.logit_bias), rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    # Another temperature keeps the threshold: logits (cos - c0) / tau.
    other = negsiglip_loss(x, y, threshold=c0, temperature=0.01, batch_size=64, repeats=1)
    z = (x @ y.T - c0) / 0.01
    neg = F.softplus(z).masked_fill(torch.eye(40, dtype=torch.bool), 0)
    torch.testing.assert_close(other, -0.01 * (F.softplus(-z.diagonal()) + 0.5 * (neg.sum(1) + neg.sum(0))))


def test_negsiglip_random_batching_is_seeded_and_unbiased():
    """With N = 9 and batches of 3, the average over many partitions converges to the exact mean over all 2-subsets
    of batch-mates (as negCLIPLoss's)."""
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(9, 8, generator=g, dtype=DT), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(9, 8, generator=g, dtype=DT), dim=1)
    tau, c0 = 0.1, 0.2
    a = negsiglip_loss(x, y, threshold=c0, temperature=tau, batch_size=3, repeats=5, seed=3)
    assert torch.equal(a, negsiglip_loss(x, y, threshold=c0, temperature=tau, batch_size=3, repeats=5, seed=3))
    assert not torch.equal(a, negsiglip_loss(x, y, threshold=c0, temperature=tau, batch_size=3, repeats=5, seed=4))
    exact = torch.zeros(9, dtype=DT)
    for i in range(9):
        values = []
        for mates in itertools.combinations([j for j in range(9) if j != i], 2):
            z = (x[[i, *mates]] @ y[[i, *mates]].T - c0) / tau
            values.append(F.softplus(-z[0, 0]) + 0.5 * (F.softplus(z[0, 1:]).sum() + F.softplus(z[1:, 0]).sum()))
        exact[i] = -tau * torch.stack(values).mean()
    estimate = negsiglip_loss(x, y, threshold=c0, temperature=tau, batch_size=3, repeats=3000, seed=0)
    torch.testing.assert_close(estimate, exact, atol=5e-3, rtol=0)


def _features(ep, n, seed):
    g = torch.Generator().manual_seed(seed)
    return PairFeatures(torch.arange(n) + 1000 * seed, torch.randn(n, ep.image_dim, generator=g, dtype=DT),
                        torch.randn(n, ep.text_dim, generator=g, dtype=DT))  # fmt: skip


def test_scorers_run_with_a_sigmoid_end_point_and_match_the_functional_forms():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=60, d_v=6, d_t=5, e=4)
    pool = PairFeatures(torch.arange(60), pool_v, pool_t)
    target = PairFeatures(torch.arange(5) + 500, target_v, target_t)
    context = RoundContext(round=0, learning_rate=0.1)
    chips = CHIPS(sketch_dim=None, bank_size=20, curvature_samples=60, components="paper")
    chips.prepare(ep, target, pool, context)
    assert "loss=sigmoid" in chips.summary()
    torch.testing.assert_close(chips.score(pool), chips_scores(pool_v, pool_t, target_v, target_t, ep, sketch_dim=None,
                                                               bank_size=20, curvature_samples=60).utility)  # fmt: skip
    robust = CHIPS(components=ROBUST_COMPONENTS, sketch_dim=64, bank_size=20, curvature_samples=60, reference_steps=5)
    robust.prepare(ep, target, pool, context)
    assert bool(torch.isfinite(robust.score(pool)).all())
    for scorer in (Dot(bank_size=20), TracIn(bank_size=20), TRAK(sketch_dim=None, bank_size=20, train_samples=60)):
        scorer.prepare(ep, target, pool, context)
        assert bool(torch.isfinite(scorer.score(pool)).all())
    dot = Dot(bank_size=20)
    dot.prepare(ep, target, pool, context)
    torch.testing.assert_close(dot.score(pool), grad_dot(pool_v, pool_t, target_v, target_t, ep, bank_size=20))
    # negCLIPLoss scores a sigmoid model with negSigLIPLoss; pairs outside the sample with the same formula.
    neg = NegCLIPLoss(batch_size=16, repeats=2, temperature=0.05)
    neg.prepare(ep, None, pool, context)
    x, y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    c0 = sigmoid_threshold(ep.logit_scale, ep.logit_bias)
    expected = negsiglip_loss(x, y, threshold=c0, temperature=0.05, batch_size=16, repeats=2, seed=0)
    torch.testing.assert_close(neg.score(pool), expected)
    assert not torch.allclose(expected, negclip_loss(x, y, temperature=0.05, batch_size=16, repeats=2, seed=0))
    outside = _features(ep, 7, seed=3)
    got = neg.score(outside)
    ox, oy = ep.embed_image(outside.image), ep.embed_text(outside.text)
    tau, total = 0.05, torch.zeros(7, dtype=DT)
    for r in range(2):
        idx = torch.randperm(60, generator=torch.Generator().manual_seed(r))[:15]
        zp = ((ox * oy).sum(1) - c0) / tau
        rows, cols = (ox @ y[idx].T - c0) / tau, (oy @ x[idx].T - c0) / tau
        total -= tau * (F.softplus(-zp) + 0.5 * (F.softplus(rows).sum(1) + F.softplus(cols).sum(1)))
    torch.testing.assert_close(got, total / 2)
    clip = CLIPScore()
    clip.prepare(ep, None, pool, context)
    torch.testing.assert_close(clip.score(pool), (x * y).sum(1))  # loss-free


def test_a_non_finite_logit_bias_is_refused():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=20)
    ep.logit_bias = torch.tensor(float("nan"), dtype=DT)
    target, pool = PairFeatures(torch.arange(5), target_v, target_t), PairFeatures(torch.arange(20), pool_v, pool_t)
    with pytest.raises(FloatingPointError, match="logit_bias"):
        CHIPS().prepare(ep, target, pool)
