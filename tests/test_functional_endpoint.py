"""Closed-form per-sample end-point gradients of the InfoNCE bank loss match autograd of an independent reference.

The reference below is written from the spec (docs/methods.md, CHIPS: per-sample loss), not from the implementation:
for pair ``i``

    x = normalize(W_v^T h_v + b_v),  y = normalize(W_t^T h_t + b_t),  s = exp(logit_scale),
    l(z_i) = 1/2 CE([s x.y, s x.Y_B], 0) + 1/2 CE([s x.y, s X_B.y], 0),

with a constant bank ``(X_B, Y_B)`` and an optional ``exclude`` mask removing bank entries from ``i``'s negatives.
Its per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))`` over a flat theta laid out as
image_proj (row-major), text_proj (row-major), logit_scale, image_bias, text_bias.
"""

from __future__ import annotations

import copy
import functools

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from lightning_chips.adapters import EndPoint, resolve_adapter
from lightning_chips.endpoint import TENSOR_FIELDS
from lightning_chips.functional import (
    EndPointDirection,
    EndPointGrads,
    bank_loss,
    bank_stats,
    endpoint_per_sample_grads,
)

from .conftest import TINY_RESNET, TINY_VIT

DT = torch.float64
CAPTIONS = [
    "a large red circle at the top",
    "fluorescence micrograph of a dividing cell",
    "a dog on a beach",
    "x",
    "satellite image of farmland",
    "",
    "two cats sleeping on a sofa",
    "a blue square",
    "handwritten digit seven",
    "a bowl of ramen",
    "night sky with stars",
    "an old map of europe",
    "a green triangle at the bottom",
    "portrait of a woman",
]
N, M = 6, 8  # batch size, bank size (CAPTIONS has N + M entries)


# -- independent reference ------------------------------------------------------------------------------------------
def _layout(ep: EndPoint) -> list[tuple[str, tuple[int, ...]]]:
    """Spec'd order of theta's blocks and their shapes."""
    e = ep.image_proj.shape[1]
    out = [
        ("image_proj", tuple(ep.image_proj.shape)),
        ("text_proj", tuple(ep.text_proj.shape)),
        ("logit_scale", ()),
    ]
    if ep.image_bias is not None:
        out.append(("image_bias", (e,)))
    if ep.text_bias is not None:
        out.append(("text_bias", (e,)))
    return out


def _flat_theta(ep: EndPoint) -> torch.Tensor:
    return torch.cat([getattr(ep, name).detach().reshape(-1) for name, _ in _layout(ep)])


def _unflat(theta: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, k = {}, 0
    for name, shape in layout:
        n = 1
        for d in shape:
            n *= d
        out[name] = theta[k : k + n].reshape(shape)
        k += n
    assert k == theta.shape[-1]
    return out


def _ref_logits(theta, h_v, h_t, bank_x, bank_y, excl, layout):
    """Logits ``a`` (image->text) and ``b`` (text->image) of ONE sample, column 0 the positive."""
    P = _unflat(theta, layout)
    e_v = h_v @ P["image_proj"]
    e_t = h_t @ P["text_proj"]
    if "image_bias" in P:
        e_v = e_v + P["image_bias"]
    if "text_bias" in P:
        e_t = e_t + P["text_bias"]
    x, y = F.normalize(e_v, dim=-1), F.normalize(e_t, dim=-1)
    s = torch.exp(P["logit_scale"])
    pos = (s * torch.dot(x, y)).reshape(1)
    neg_a = s * (bank_y @ x)
    neg_b = s * (bank_x @ y)
    if excl is not None:
        neg_a = torch.where(excl, torch.full_like(neg_a, float("-inf")), neg_a)
        neg_b = torch.where(excl, torch.full_like(neg_b, float("-inf")), neg_b)
    return torch.cat([pos, neg_a]), torch.cat([pos, neg_b])


def _ref_loss_one(theta, h_v, h_t, bank_x, bank_y, excl, layout):
    a, b = _ref_logits(theta, h_v, h_t, bank_x, bank_y, excl, layout)
    target = torch.zeros(1, dtype=torch.long)
    return 0.5 * F.cross_entropy(a[None], target) + 0.5 * F.cross_entropy(b[None], target)


def ref_losses(theta, h_v, h_t, bank_x, bank_y, exclude, layout):
    """``[N]`` reference losses (``theta`` shared) or ``[N]`` losses with per-sample ``theta`` ``[N, D]``."""
    theta_dim = 0 if theta.dim() == 2 else None
    excl_dim = None if exclude is None else 0
    f = functools.partial(_ref_loss_one, layout=layout)
    return vmap(f, in_dims=(theta_dim, 0, 0, None, None, excl_dim))(theta, h_v, h_t, bank_x, bank_y, exclude)


def ref_per_sample_grads(theta, h_v, h_t, bank_x, bank_y, exclude, layout):
    f = functools.partial(_ref_loss_one, layout=layout)
    excl_dim = None if exclude is None else 0
    return vmap(grad(f), in_dims=(None, 0, 0, None, None, excl_dim))(theta, h_v, h_t, bank_x, bank_y, exclude)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


# -- real open_clip features ----------------------------------------------------------------------------------------
def _model_configs():
    custom_bias = copy.deepcopy(TINY_VIT)
    custom_bias["text_cfg"]["proj_bias"] = True
    return {
        "vit": (open_clip.CLIP, copy.deepcopy(TINY_VIT), 32),
        "modified_resnet": (open_clip.CLIP, copy.deepcopy(TINY_RESNET), 64),
        "custom_text_proj_bias": (open_clip.CustomTextCLIP, custom_bias, 32),
    }


@functools.cache
def _setup(name: str):
    """Features of N batch pairs and M bank pairs, a perturbed float64 end point, and the normalised bank."""
    cls, cfg, size = _model_configs()[name]
    gen = torch.Generator().manual_seed(1234)
    model = cls(**cfg).double().eval()
    adapter = resolve_adapter(model)
    images = torch.randn(N + M, 3, size, size, generator=gen, dtype=DT)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(CAPTIONS[: N + M])
    with torch.no_grad():
        h_v, h_t = adapter.image_features(images), adapter.text_features(tokens)
        ep = adapter.endpoint().detach().to(DT)

        # Perturb every end-point tensor away from init, so a wrong transpose or a dropped bias cannot pass.
        def perturb(t):
            if t is None:
                return None
            return t + 0.05 * t.abs().mean().clamp_min(0.1) * torch.randn(t.shape, generator=gen, dtype=DT)

        ep = ep.replace(**{field: perturb(getattr(ep, field)) for field in TENSOR_FIELDS})
        ep.logit_scale = torch.tensor(1.7, dtype=DT)  # s ~ 5.5: softmaxes neither one-hot nor uniform
    assert h_v.dtype == DT and h_t.dtype == DT
    bank_x, bank_y = ep.embed_image(h_v[N:]), ep.embed_text(h_t[N:])
    return h_v[:N], h_t[:N], ep, bank_x, bank_y


def _exclude_mask() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand(N, M, generator=gen) < 0.4
    mask[0] = False  # nothing excluded
    mask[1, :-1] = True  # all but one bank entry excluded
    mask[2] = True  # everything excluded: the loss is log(1) = 0 and the gradient is zero
    return mask


MODELS = list(_model_configs())
BANKS = ["other_pairs", "other_pairs_with_exclude", "batch_itself_exclude_identity"]


def _case(name: str, bank: str):
    h_v, h_t, ep, bank_x, bank_y = _setup(name)
    exclude = None
    if bank == "other_pairs_with_exclude":
        exclude = _exclude_mask()
    elif bank == "batch_itself_exclude_identity":
        bank_x, bank_y = ep.embed_image(h_v), ep.embed_text(h_t)
        exclude = torch.eye(N, dtype=torch.bool)
    return h_v, h_t, ep, bank_x.detach(), bank_y.detach(), exclude


# -- 1. closed form == vmap(grad(reference)) -----------------------------------------------------------------------
@pytest.mark.parametrize("bank", BANKS)
@pytest.mark.parametrize("name", MODELS)
def test_closed_form_matches_vmap_grad_of_reference(name, bank):
    h_v, h_t, ep, bank_x, bank_y, exclude = _case(name, bank)
    layout = _layout(ep)
    theta = _flat_theta(ep)
    g = endpoint_per_sample_grads(h_v, h_t, ep, bank_x, bank_y, exclude=exclude)
    assert isinstance(g, EndPointGrads) and len(g) == N

    ref = ref_per_sample_grads(theta, h_v, h_t, bank_x, bank_y, exclude, layout)
    assert torch.isfinite(ref).all()
    assert ref.shape == (N, theta.numel()) == (N, ep.num_parameters)
    flat = g.flatten()
    assert flat.shape == ref.shape and flat.dtype == DT
    assert torch.isfinite(flat).all()
    assert rel_err(flat, ref) < 1e-5
    # Per block too, so a small block (logit_scale, a bias) cannot hide under the big projection blocks.
    k = 0
    for block, shape in layout:
        n = int(torch.Size(shape).numel())
        ref_b, got_b = ref[:, k : k + n], flat[:, k : k + n]
        assert ref_b.abs().max() > 0, block
        assert (got_b - ref_b).abs().max() <= 1e-5 * ref_b.abs().max(), block
        k += n
    # Which bias blocks exist follows the end point.
    assert g.image_bias == (name == "modified_resnet")
    assert g.text_bias == (name == "custom_text_proj_bias")
    if exclude is not None and exclude.all(1).any():
        # A sample with every negative excluded has zero loss and zero gradient.
        rows = exclude.all(1)
        assert flat[rows].abs().max() == 0
        assert ref[rows].abs().max() == 0


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("image_bias, text_bias", [(False, False), (True, False), (False, True), (True, True)])
def test_closed_form_matches_reference_for_every_bias_combination(image_bias, text_bias, exclude):
    """Synthetic end points, including both biases at once (no tiny open_clip model has both)."""
    gen = torch.Generator().manual_seed(21)
    d_v, d_t, e, n, m = 6, 5, 4, 5, 7

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT)

    ep = EndPoint(
        r(d_v, e), r(d_t, e), torch.tensor(0.8, dtype=DT), r(e) if image_bias else None, r(e) if text_bias else None
    )
    h_v, h_t = r(n, d_v), r(n, d_t)
    bank_x, bank_y = F.normalize(r(m, e), dim=1), F.normalize(r(m, e), dim=1)
    mask = (torch.rand(n, m, generator=gen) < 0.3) if exclude else None
    g = endpoint_per_sample_grads(h_v, h_t, ep, bank_x, bank_y, exclude=mask)
    ref = ref_per_sample_grads(_flat_theta(ep), h_v, h_t, bank_x, bank_y, mask, _layout(ep))
    assert g.flatten().shape == ref.shape
    assert rel_err(g.flatten(), ref) < 1e-5
    # The bias blocks themselves (last columns, image before text) carry the bias gradients.
    nb = e * (int(image_bias) + int(text_bias))
    if nb:
        assert rel_err(g.flatten()[:, -nb:], ref[:, -nb:]) < 1e-5


def test_closed_form_accepts_live_float64_parameters():
    """``adapter.endpoint()`` (live, requires_grad) gives the same numbers as a detached snapshot."""
    model = open_clip.CLIP(**copy.deepcopy(TINY_RESNET)).double().eval()
    adapter = resolve_adapter(model)
    gen = torch.Generator().manual_seed(3)
    h_v = torch.randn(4, adapter.endpoint().image_dim, generator=gen, dtype=DT)
    h_t = torch.randn(4, adapter.endpoint().text_dim, generator=gen, dtype=DT)
    bank = F.normalize(torch.randn(5, adapter.endpoint().embed_dim, generator=gen, dtype=DT), dim=1)
    live = adapter.endpoint()
    got = endpoint_per_sample_grads(h_v, h_t, live, bank, bank).flatten().detach()
    snap = endpoint_per_sample_grads(h_v, h_t, live.detach(), bank, bank).flatten()
    torch.testing.assert_close(got, snap, rtol=0, atol=0)
    ref = ref_per_sample_grads(_flat_theta(live), h_v, h_t, bank, bank, None, _layout(live))
    assert rel_err(got, ref) < 1e-5


# -- 2. loss and learnability --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bank", BANKS)
@pytest.mark.parametrize("name", MODELS)
def test_bank_loss_and_learnability_match_reference(name, bank):
    h_v, h_t, ep, bank_x, bank_y, exclude = _case(name, bank)
    layout = _layout(ep)
    theta = _flat_theta(ep)
    ref_loss = ref_losses(theta, h_v, h_t, bank_x, bank_y, exclude, layout)
    loss = bank_loss(h_v, h_t, ep, bank_x, bank_y, exclude=exclude)
    assert loss.shape == (N,)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)

    stats = bank_stats(h_v, h_t, ep, bank_x, bank_y, exclude=exclude)
    torch.testing.assert_close(stats.loss, ref_loss, rtol=1e-10, atol=1e-12)
    excl = None if exclude is None else 0
    a, b = vmap(functools.partial(_ref_logits, layout=layout), in_dims=(None, 0, 0, None, None, excl))(
        theta, h_v, h_t, bank_x, bank_y, exclude
    )
    m_bank = bank_x.shape[0]
    assert stats.logits_i2t.shape == stats.logits_t2i.shape == stats.p.shape == stats.q.shape == (N, m_bank + 1)
    torch.testing.assert_close(stats.logits_i2t, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.logits_t2i, b, rtol=1e-10, atol=1e-12)
    p, q = a.softmax(1), b.softmax(1)
    torch.testing.assert_close(stats.p, p, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.q, q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.p.sum(1), torch.ones(N, dtype=DT))

    # w_L = (1 - p_corr)(1 + sigmoid(-m)), m = mean over directions of (positive - hardest bank logit).
    p_corr = 0.5 * (p[:, 0] + q[:, 0])
    m = 0.5 * ((a[:, 0] - a[:, 1:].max(1).values) + (b[:, 0] - b[:, 1:].max(1).values))
    ref_w = (1 - p_corr) * (1 + torch.sigmoid(-m))
    w = stats.learnability()
    assert w.shape == (N,)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    assert (w >= 0).all() and (w < 2).all()


@pytest.mark.parametrize("logit_scale", [-3.0, 0.0, 2.0, 4.6])
def test_learnability_range(logit_scale):
    """[0, 2) over easy (aligned) and hard (anti-aligned, with a duplicate negative) samples and any temperature."""
    gen = torch.Generator().manual_seed(11)
    e, n, m = 8, 12, 10
    ep = EndPoint(torch.eye(e, dtype=DT), torch.eye(e, dtype=DT), torch.tensor(logit_scale, dtype=DT))
    h_v = torch.randn(n, e, generator=gen, dtype=DT)
    h_t = torch.randn(n, e, generator=gen, dtype=DT)
    h_t[:4] = h_v[:4]  # positives aligned
    h_t[4:8] = -h_v[4:8]  # positives anti-aligned
    bank_x = F.normalize(torch.randn(m, e, generator=gen, dtype=DT), dim=1)
    bank_y = F.normalize(torch.randn(m, e, generator=gen, dtype=DT), dim=1)
    bank_y[0] = F.normalize(h_t[8], dim=0)  # a bank entry equal to the positive: margin 0
    bank_x[0] = F.normalize(h_v[8], dim=0)
    w = bank_stats(h_v, h_t, ep, bank_x, bank_y).learnability()
    assert torch.isfinite(w).all()
    assert (w >= 0).all() and (w <= 2).all()
    if logit_scale < 4:
        # Strictly below 2 unless float64 saturates (s = 100 and an anti-aligned positive: p_0 ~ e^-200, and
        # (1 - p_0)(1 + sigmoid(200)) rounds to exactly 2).
        assert (w < 2).all()
    # Harder samples are more learnable: anti-aligned positives beat aligned ones.
    assert w[4:8].min() > w[:4].max()


# -- 3. factored algebra == dense algebra --------------------------------------------------------------------------
BIASES = [(False, False), (True, False), (False, True), (True, True)]


def _synthetic_grads(image_bias: bool, text_bias: bool, n: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d_v, d_t, e, m = 5, 4, 3, 6

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT)

    ep = EndPoint(
        r(d_v, e), r(d_t, e), torch.tensor(1.3, dtype=DT), r(e) if image_bias else None, r(e) if text_bias else None
    )
    bank_x, bank_y = F.normalize(r(m, e), dim=1), F.normalize(r(m, e), dim=1)
    g = endpoint_per_sample_grads(r(n, d_v), r(n, d_t), ep, bank_x, bank_y)
    direction = EndPointDirection(
        image_proj=r(d_v, e),
        text_proj=r(d_t, e),
        logit_scale=r(()),
        image_bias=r(e) if image_bias else None,
        text_bias=r(e) if text_bias else None,
    )
    return ep, g, direction


@pytest.mark.parametrize("image_bias, text_bias", BIASES)
def test_factored_algebra_matches_dense(image_bias, text_bias):
    ep, g, direction = _synthetic_grads(image_bias, text_bias)
    _, g2, _ = _synthetic_grads(image_bias, text_bias, n=5, seed=1)
    G, G2 = g.flatten(), g2.flatten()
    assert G.shape == (7, ep.num_parameters) and g.dim == ep.num_parameters
    assert g.image_bias == image_bias and g.text_bias == text_bias

    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(g.gram(), G @ G.T, **tol)
    torch.testing.assert_close(g.gram(g2), G @ G2.T, **tol)
    torch.testing.assert_close(g.sq_norms(), (G * G).sum(1), **tol)
    torch.testing.assert_close(g.sq_norms(), torch.diagonal(g.gram()), **tol)

    # The direction flattens in the spec'd order ...
    blocks = [direction.image_proj.reshape(-1), direction.text_proj.reshape(-1), direction.logit_scale.reshape(1)]
    blocks += [b for b in (direction.image_bias, direction.text_bias) if b is not None]
    v = direction.flatten()
    torch.testing.assert_close(v, torch.cat(blocks), rtol=0, atol=0)
    # ... and dot / weighted_sum agree with the dense matrix.
    torch.testing.assert_close(g.dot(direction), G @ v, **tol)
    w = torch.randn(7, generator=torch.Generator().manual_seed(5), dtype=DT)
    ws = g.weighted_sum(w)
    assert isinstance(ws, EndPointDirection)
    assert (ws.image_bias is not None) == image_bias and (ws.text_bias is not None) == text_bias
    torch.testing.assert_close(ws.flatten(), w @ G, **tol)
    torch.testing.assert_close(g.dot(ws), G @ (w @ G), **tol)

    # index / cat round-trip.
    idx = torch.tensor([4, 0, 6])
    torch.testing.assert_close(g.index(idx).flatten(), G[idx], rtol=0, atol=0)
    torch.testing.assert_close(g.index(torch.arange(7) % 2 == 0).flatten(), G[::2], rtol=0, atol=0)
    perm = torch.tensor([3, 1, 5, 0, 6, 2, 4])
    parts = [g.index(perm[:2]), g.index(perm[2:3]), g.index(perm[3:])]
    cat = EndPointGrads.cat(parts)
    assert len(cat) == 7 and cat.image_bias == image_bias and cat.text_bias == text_bias
    torch.testing.assert_close(cat.flatten(), G[perm], rtol=0, atol=0)
    torch.testing.assert_close(cat.gram(), G[perm] @ G[perm].T, **tol)
    both = EndPointGrads.cat([g, g2])
    torch.testing.assert_close(both.flatten(), torch.cat([G, G2]), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_factored_algebra_on_real_features(name):
    h_v, h_t, ep, bank_x, bank_y, exclude = _case(name, "other_pairs_with_exclude")
    g = endpoint_per_sample_grads(h_v, h_t, ep, bank_x, bank_y, exclude=exclude)
    G = g.flatten()
    scale = (G @ G.T).abs().max()
    assert (g.gram() - G @ G.T).abs().max() <= 1e-12 * scale
    assert (g.sq_norms() - (G * G).sum(1)).abs().max() <= 1e-12 * scale
    w = torch.full((N,), 1.0 / N, dtype=DT)
    mean = g.weighted_sum(w)
    torch.testing.assert_close(mean.flatten(), G.mean(0), rtol=1e-12, atol=1e-14)
    assert (g.dot(mean) - G @ G.mean(0)).abs().max() <= 1e-12 * scale


# -- 4. a step along -g_i lowers l(z_i) ----------------------------------------------------------------------------
@pytest.mark.parametrize("bank", ["other_pairs", "batch_itself_exclude_identity"])
@pytest.mark.parametrize("name", MODELS)
def test_gradient_step_lowers_each_sample_loss(name, bank):
    h_v, h_t, ep, bank_x, bank_y, exclude = _case(name, bank)
    layout = _layout(ep)
    theta = _flat_theta(ep)
    G = endpoint_per_sample_grads(h_v, h_t, ep, bank_x, bank_y, exclude=exclude).flatten()
    norms = G.norm(dim=1)
    assert (norms > 0).all()
    eta = 1e-4 / norms  # step length 1e-4 in theta-space for every sample
    before = ref_losses(theta, h_v, h_t, bank_x, bank_y, exclude, layout)
    after = ref_losses(theta[None] - eta[:, None] * G, h_v, h_t, bank_x, bank_y, exclude, layout)
    assert (after < before).all()
    # First order: the decrease is eta ||g_i||^2 (so g_i is the gradient, not just a descent direction).
    torch.testing.assert_close(before - after, eta * norms**2, rtol=1e-2, atol=0)
