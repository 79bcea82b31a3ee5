"""Full-parameter Dot / TracIn / TRAK: against the closed-form end point, per-sample autograd, and dattri."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from scipy.stats import spearmanr
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_chips.adapters import resolve_adapter
from lightning_chips.functional import (
    GradientProjection,
    endpoint_parameter_names,
    full_parameter_bank,
    full_parameter_grads,
    full_parameter_influence,
    select_parameters,
)
from lightning_chips.functional.influence import grad_dot, tracin_scores, trak_scores

from .conftest import TINY_RESNET, TINY_VIT

D64 = torch.float64
# A CLIP small enough for dense full-parameter gradients and dattri's D x D TRAK kernel (D = 2,529 parameters).
NANO = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 8, "layers": 1, "width": 8, "head_width": 4, "patch_size": 4},
    "text_cfg": {"context_length": 6, "vocab_size": 16, "width": 8, "heads": 2, "layers": 1},
}


def _model(config: dict, seed: int = 0, endpoint_only: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(config)).double()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # s = e^2: softmaxes that are neither flat nor one-hot
    if endpoint_only:
        names = set(endpoint_parameter_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
    return model


def _pairs(config: dict, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size, text = config["vision_cfg"]["image_size"], config["text_cfg"]
    images = torch.randn(n, 3, size, size, generator=g, dtype=D64)
    tokens = torch.randint(1, text["vocab_size"], (n, text["context_length"]), generator=g)
    return images, tokens


def _reference_loss(model, bank_image, bank_text):
    """The per-sample bank loss written from CLIP.forward's normalised embeddings (no adapter, no bank_stats)."""

    def loss(params, image, tokens, own):
        x, y, s = functional_call(model, params, (image[None], tokens[None]))
        # mask after scaling: s * -inf would give the logit scale a nan gradient
        a = torch.cat([s * (x * y).sum(1), torch.where(own, float("-inf"), s * x[0] @ bank_text.T)])
        b = torch.cat([s * (x * y).sum(1), torch.where(own, float("-inf"), s * y[0] @ bank_image.T)])
        return 0.5 * (torch.logsumexp(a, 0) - a[0]) + 0.5 * (torch.logsumexp(b, 0) - b[0])

    return loss


def _autograd_rows(model, images, tokens, own, bank):
    """Per-sample gradients by a plain backward pass per pair, in named_parameters order."""
    loss = _reference_loss(model, bank.image, bank.text)
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(images)):
        grads = torch.autograd.grad(loss(params, images[i], tokens[i], own[i]), list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_endpoint_only_full_gradients_equal_the_closed_form():
    """With only the heads and logit_scale trainable, the full-parameter path is the end-point path."""
    model = _model(TINY_VIT, endpoint_only=True)
    adapter = resolve_adapter(model)
    assert list(select_parameters(model)) == ["text_projection", "logit_scale", "visual.proj"]
    pool_images, pool_tokens = _pairs(TINY_VIT, 40, seed=1)
    target_images, target_tokens = _pairs(TINY_VIT, 5, seed=2)
    ids = torch.arange(100, 140)
    bank = full_parameter_bank(model, pool_images, pool_tokens, ids, bank_size=16, seed=3)
    full = full_parameter_grads(model, pool_images, pool_tokens, bank, ids, chunk_size=7)

    with torch.no_grad():
        h_v, h_t = adapter.image_features(pool_images), adapter.text_features(pool_tokens)
        t_v, t_t = adapter.image_features(target_images), adapter.text_features(target_tokens)
    ep = adapter.endpoint().detach()
    closed = bank.grads(h_v, h_t, ep, ids).flatten()  # image_proj, text_proj, logit_scale
    d_v, d_t = ep.image_proj.numel(), ep.text_proj.numel()
    reordered = torch.cat([full[:, d_t + 1 :], full[:, :d_t], full[:, d_t : d_t + 1]], dim=1)
    assert (reordered - closed).abs().max() < 1e-10
    assert reordered.shape == (40, d_v + d_t + 1)
    assert model.training  # eval mode was only borrowed

    # Dot, TracIn and TRAK equal the end-point functions on the same bank, training sample and damping rule.
    kwargs = dict(bank_size=16, seed=3)
    dot = full_parameter_influence(model, pool_images, pool_tokens, target_images, target_tokens, **kwargs)
    torch.testing.assert_close(dot, grad_dot(h_v, h_t, t_v, t_t, ep, **kwargs), rtol=1e-9, atol=1e-12)
    other = _model(TINY_VIT, endpoint_only=True)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.visual.proj.mul_(1.1)
        other.logit_scale.add_(0.2)
    tracin = full_parameter_influence([model, other], pool_images, pool_tokens, target_images, target_tokens,
                                      method="tracin", learning_rates=[0.5, 0.25], **kwargs)  # fmt: skip
    expected = tracin_scores([(ep, 0.5), (resolve_adapter(other).endpoint().detach(), 0.25)], h_v, h_t, t_v, t_t,
                             **kwargs)  # fmt: skip
    torch.testing.assert_close(tracin, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", [None, 0.5])
def test_endpoint_only_full_trak_equals_endpoint_trak(damping):
    """The same TRAK training sample, damping rule and Q; the full path solves by Woodbury (30 < D = 129)."""
    model = _model(NANO, endpoint_only=True)
    adapter = resolve_adapter(model)
    pool_images, pool_tokens = _pairs(NANO, 40, seed=1)
    target_images, target_tokens = _pairs(NANO, 5, seed=2)
    kwargs = dict(bank_size=16, seed=3, train_samples=30, damping=damping)
    trak = full_parameter_influence(model, pool_images, pool_tokens, target_images, target_tokens, method="trak",
                                    **kwargs)  # fmt: skip
    with torch.no_grad():
        h_v, h_t = adapter.image_features(pool_images), adapter.text_features(pool_tokens)
        t_v, t_t = adapter.image_features(target_images), adapter.text_features(target_tokens)
    expected = trak_scores([adapter.endpoint().detach()], h_v, h_t, t_v, t_t, sketch_dim=None, **kwargs)
    torch.testing.assert_close(trak, expected, rtol=1e-8, atol=1e-12)


def test_full_gradients_equal_per_sample_autograd_of_clip_forward():
    model = _model(NANO)
    images, tokens = _pairs(NANO, 12, seed=1)
    ids = torch.arange(12)
    bank = full_parameter_bank(model, images, tokens, ids, bank_size=6)
    own = bank.exclusion(ids)
    reference = _autograd_rows(model, images, tokens, own, bank)
    full = full_parameter_grads(model, images, tokens, bank, ids, chunk_size=5)
    assert full.shape == (12, sum(p.numel() for p in model.parameters()))
    assert (full - reference).abs().max() < 1e-10 * reference.abs().max()

    # A subset by prefix is the matching columns of the full gradient, in named_parameters order.
    names = [name for name, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    subset = ["visual.transformer.resblocks.0.mlp", *endpoint_parameter_names(model)]
    chosen = select_parameters(model, subset)
    assert (
        list(chosen) == [n for n in names if n in chosen] and "visual.transformer.resblocks.0.mlp.c_fc.weight" in chosen
    )
    columns = torch.cat([col for n, col in zip(names, full.split(sizes, dim=1), strict=True) if n in chosen], dim=1)
    torch.testing.assert_close(full_parameter_grads(model, images, tokens, bank, ids, params=subset), columns)

    # Projections are seeded and chunk-independent, and approximate inner products (JL).
    proj = full_parameter_grads(model, images, tokens, bank, ids, sketch_dim=512, seed=1, chunk_size=12)
    torch.testing.assert_close(proj, full_parameter_grads(model, images, tokens, bank, ids, sketch_dim=512, seed=1,
                                                          chunk_size=5))  # fmt: skip
    torch.testing.assert_close(proj, full @ torch.cat([GradientProjection(full.shape[1], 512, seed=1)._block(0)]))
    exact, sketched = full @ full.mean(0), proj @ proj.mean(0)
    assert spearmanr(exact.numpy(), sketched.numpy())[0] > 0.9


def test_endpoint_names_resolve_views_of_resnet_heads():
    model = open_clip.CLIP(**copy.deepcopy(TINY_RESNET))
    assert set(endpoint_parameter_names(model)) == {
        "text_projection", "logit_scale", "visual.attnpool.c_proj.weight", "visual.attnpool.c_proj.bias",
    }  # fmt: skip


def _dattri():
    """dattri's attributors; only the tests that compare with dattri skip without it."""
    pytest.importorskip("dattri")
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    return TracInAttributor, TRAKAttributor, AttributionTask


IDENTITY = {"proj_type": "identity"}  # dattri keeps its 512-dim random projection with projector_kwargs=None


def _dattri_setup(n: int = 40, t: int = 4):
    model = _model(NANO).eval()
    pool_images, pool_tokens = _pairs(NANO, n, seed=1)
    target_images, target_tokens = _pairs(NANO, t, seed=2)
    ids = torch.arange(n)
    bank = full_parameter_bank(model, pool_images, pool_tokens, ids, bank_size=n)  # the whole pool
    loss = _reference_loss(model, bank.image, bank.text)

    def correct_probability(params, data):  # dattri calls it on single samples and on batches
        image, tokens, own = data
        single = image.dim() == 3
        if single:
            image, tokens, own = image[None], tokens[None], own[None]
        x, y, s = functional_call(model, params, (image, tokens))
        pos = s * (x * y).sum(1, keepdim=True)
        a = torch.cat([pos, (s * x @ bank.text.T).masked_fill(own, float("-inf"))], 1)
        b = torch.cat([pos, (s * y @ bank.image.T).masked_fill(own, float("-inf"))], 1)
        p_corr = 0.5 * (a.softmax(1)[:, 0] + b.softmax(1)[:, 0])
        return p_corr[0] if single else p_corr

    task = _dattri()[2](loss_func=lambda params, data: loss(params, *data), model=model,
                           checkpoints=model.state_dict())  # fmt: skip
    train = DataLoader(TensorDataset(pool_images, pool_tokens, bank.exclusion(ids)), batch_size=16, shuffle=False)
    none = torch.zeros(t, n, dtype=torch.bool)
    test = DataLoader(TensorDataset(target_images, target_tokens, none), batch_size=16, shuffle=False)
    data = (pool_images, pool_tokens, target_images, target_tokens)
    return model, data, task, train, test, correct_probability


def _assert_rank_agreement(ours, theirs):
    for j in range(ours.shape[1]):
        rho = spearmanr(ours[:, j].numpy(), theirs[:, j].double().numpy())[0]
        assert rho >= 0.999, (j, rho)


def test_full_parameter_dot_and_tracin_agree_with_dattri():
    model, data, task, train, test, _ = _dattri_setup()
    lr = 0.3
    attributor = _dattri()[0](task=task, weight_list=torch.tensor([lr]), normalized_grad=False,
                                  projector_kwargs=dict(IDENTITY))  # fmt: skip
    theirs = attributor.attribute(train, test)
    ours = full_parameter_influence(model, *data, per_target=True, bank_size=40)
    _assert_rank_agreement(ours, theirs)
    torch.testing.assert_close(lr * ours, theirs.double(), rtol=1e-6, atol=1e-9)
    tracin = full_parameter_influence([model], *data, method="tracin", learning_rates=[lr], bank_size=40)
    torch.testing.assert_close(tracin, lr * ours.mean(1))


def test_full_parameter_trak_agrees_with_dattri_with_identity_projection():
    model, data, task, train, test, correct_probability = _dattri_setup()
    lam = 1e-3
    attributor = _dattri()[1](task=task, correct_probability_func=correct_probability,
                                projector_kwargs=dict(IDENTITY), regularization=lam)  # fmt: skip
    attributor.cache(train)
    theirs = attributor.attribute(test)
    dim = sum(p.numel() for p in model.parameters())
    # dattri divides every gradient by sqrt(D): its regularization is our damping / D.
    ours = full_parameter_influence(model, *data, method="trak", per_target=True, damping=lam * dim, bank_size=40)
    _assert_rank_agreement(ours, theirs)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-5, atol=1e-8)


def test_full_parameter_influence_validates_its_arguments():
    model = _model(NANO)
    images, tokens = _pairs(NANO, 6, seed=1)
    with pytest.raises(ValueError, match="Unknown influence method"):
        full_parameter_influence(model, images, tokens, images, tokens, method="trac")
    with pytest.raises(ValueError, match="target set is empty"):
        full_parameter_influence(model, images, tokens, images[:0], tokens[:0])
    with pytest.raises(ValueError, match="method='tracin'"):
        full_parameter_influence([model, model], images, tokens, images, tokens)
    with pytest.raises(ValueError, match="one per checkpoint"):
        full_parameter_influence([model], images, tokens, images, tokens, method="tracin", learning_rates=[1, 2])
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, "visual.transformer.resblocks.7")
    bank = full_parameter_bank(model, images, tokens, bank_size=3)
    with pytest.raises(ValueError, match="chunk_size"):
        full_parameter_grads(model, images, tokens, bank, chunk_size=0)
