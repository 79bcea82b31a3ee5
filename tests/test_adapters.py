"""Adapters reach the pre-projection features and live end-point parameters of every supported CLIP."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn

from lightning_chips.adapters import (
    EndPoint,
    OpenCLIPAdapter,
    ProtocolAdapter,
    SupportsEndPoint,
    UnsupportedModelError,
    resolve_adapter,
)
from lightning_chips.models import OpenCLIPModule

from .conftest import TINY_RESNET, TINY_VIT

CAPTIONS = ["a large red circle at the top", "fluorescence micrograph of a dividing cell", "x", ""]


def _models():
    custom_bias = copy.deepcopy(TINY_VIT)
    custom_bias["text_cfg"]["proj_bias"] = True
    custom_argmax_off = copy.deepcopy(TINY_VIT)
    custom_argmax_off["text_cfg"]["pool_type"] = "last"
    return {
        "vit": (open_clip.CLIP(**copy.deepcopy(TINY_VIT)), 32),
        "modified_resnet": (open_clip.CLIP(**copy.deepcopy(TINY_RESNET)), 64),
        "custom_text": (open_clip.CustomTextCLIP(**copy.deepcopy(TINY_VIT)), 32),
        "custom_text_linear_proj": (open_clip.CustomTextCLIP(**custom_bias), 32),
        "custom_text_last_pool": (open_clip.CustomTextCLIP(**custom_argmax_off), 32),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_adapter_embeddings_match_the_models_own(name):
    model, size = _models()[name]
    # Perturb the projections away from their init so a wrong transpose or a dropped bias cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    adapter = resolve_adapter(model)
    assert isinstance(adapter, OpenCLIPAdapter)
    images = torch.randn(4, 3, size, size)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(CAPTIONS)
    with torch.no_grad():
        h_v, h_t = adapter.image_features(images), adapter.text_features(tokens)
        ep = adapter.endpoint()
        assert h_v.shape == (4, ep.image_dim) and h_t.shape == (4, ep.text_dim)
        torch.testing.assert_close(ep.embed_image(h_v), model.encode_image(images, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(ep.embed_text(h_t), model.encode_text(tokens, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(ep.scale(), model.logit_scale.exp().reshape(()))


def test_modified_resnet_endpoint_has_the_attnpool_bias():
    model = open_clip.CLIP(**copy.deepcopy(TINY_RESNET))
    ep = resolve_adapter(model).endpoint()
    assert ep.image_bias is model.visual.attnpool.c_proj.bias
    assert ep.image_proj.shape == (model.visual.attnpool.c_proj.in_features, 32)
    # dim(theta) counts W_v, W_t, the scale and the bias.
    assert ep.num_parameters == ep.image_proj.numel() + ep.text_proj.numel() + 1 + 32


def test_endpoint_holds_live_parameters():
    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT))
    ep = resolve_adapter(model).endpoint()
    assert ep.image_proj is model.visual.proj and ep.text_proj is model.text_projection
    # A gradient through the end point reaches the model's parameters ...
    h = torch.randn(3, ep.image_dim)
    (ep.embed_image(h).sum() + ep.scale()).backward()
    assert model.visual.proj.grad is not None and model.logit_scale.grad is not None
    # ... and a snapshot does not move when the model does.
    snap = ep.detach()
    with torch.no_grad():
        model.visual.proj.add_(1.0)
    assert torch.equal(ep.image_proj, model.visual.proj)
    assert not torch.equal(snap.image_proj, model.visual.proj)


def test_nonscalar_logit_scale_is_reported_as_0d():
    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT), nonscalar_logit_scale=True)
    ep = resolve_adapter(model).endpoint()
    assert ep.logit_scale.dim() == 0
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    assert ep.logit_scale.item() == 1.5


def test_resolves_the_clip_inside_a_lightning_module(tiny_vit_config):
    module = OpenCLIPModule(model_config=tiny_vit_config)
    adapter = resolve_adapter(module)
    assert adapter.module is module.model


class TwoTower(nn.Module):
    """A user module that implements the protocol itself."""

    def __init__(self):
        super().__init__()
        self.image_tower, self.text_tower = nn.Linear(12, 6), nn.Embedding(100, 5)
        self.w_v, self.w_t = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5, 4))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def image_features(self, images):
        return self.image_tower(images.flatten(1))

    def text_features(self, tokens):
        return self.text_tower(tokens).mean(1)

    def endpoint(self):
        return EndPoint(self.w_v, self.w_t, self.logit_scale)


def test_protocol_module_is_adapted():
    model = TwoTower()
    assert isinstance(model, SupportsEndPoint)
    adapter = resolve_adapter(model)
    assert isinstance(adapter, ProtocolAdapter)
    x = torch.randn(2, 3, 2, 2)
    expected = torch.nn.functional.normalize(model.image_tower(x.flatten(1)) @ model.w_v, dim=-1)
    torch.testing.assert_close(adapter.encode_image(x), expected)


def test_unsupported_model_names_the_protocol():
    with pytest.raises(UnsupportedModelError, match="SupportsEndPoint"):
        resolve_adapter(nn.Linear(3, 3))


def test_vit_without_projection_is_rejected():
    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT))
    model.visual.proj = None
    with pytest.raises(UnsupportedModelError, match="no projection head"):
        resolve_adapter(model)


def test_ddp_wrapper_is_unwrapped():
    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT))
    wrapper = nn.Module()
    wrapper.module = model  # DDP-like attribute is not enough on its own; torch.compile's `_orig_mod` is.
    wrapper._orig_mod = model
    assert resolve_adapter(wrapper).module is model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_proj": torch.randn(3), "text_proj": torch.randn(4, 2)}, "2-d"),
        ({"image_proj": torch.randn(3, 2), "text_proj": torch.randn(4, 5)}, "same embedding dimension"),
        ({"image_proj": torch.randn(3, 2), "text_proj": torch.randn(4, 2), "image_bias": torch.randn(3)}, "image_bias"),
    ],
)
def test_endpoint_validates_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EndPoint(logit_scale=torch.tensor(1.0), **kwargs)


def _text_variants() -> dict:
    def custom(pad_mask: bool = False, **text_cfg) -> open_clip.CustomTextCLIP:
        cfg = copy.deepcopy(TINY_VIT)
        cfg["text_cfg"].update(text_cfg)
        model = open_clip.CustomTextCLIP(**cfg)
        model.text.use_pad_mask = pad_mask  # open_clip sets it from its constructor only (not CLIPTextCfg)
        return model

    def clip(**text_cfg) -> open_clip.CLIP:
        cfg = copy.deepcopy(TINY_VIT)
        cfg["text_cfg"].update(text_cfg)
        return open_clip.CLIP(**cfg)

    return {  # name: (model, whether padding after the pooled token may be cut)
        "clip_argmax": (clip(), True),
        "clip_bidirectional": (clip(no_causal_mask=True), False),
        "custom_argmax": (custom(), True),
        "custom_eos": (custom(pool_type="eos", eos_id=49407), True),
        "custom_first": (custom(pool_type="first"), True),
        "custom_bidirectional_pad_masked": (custom(no_causal_mask=True, pad_mask=True), True),
        "custom_bidirectional_unmasked": (custom(no_causal_mask=True), False),
        "custom_last_pool": (custom(pool_type="last"), False),
        "custom_cls_token": (custom(embed_cls=True, pool_type="last", pad_mask=True), False),
    }


@pytest.mark.parametrize("name", list(_text_variants()))
def test_trimmed_tokens_give_the_full_context_features(name):
    model, trims = _text_variants()[name]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    adapter = resolve_adapter(model)
    captions = ["a red circle", "fluorescence micrograph of a dividing cell nucleus", "x", ""]
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(captions)
    trimmed = adapter.trim_tokens(tokens)
    torch.testing.assert_close(trimmed, tokens[:, : trimmed.shape[1]], rtol=0, atol=0)  # a prefix
    if not trims:
        assert trimmed.shape == tokens.shape
    elif name == "custom_first":
        assert trimmed.shape[1] == 1
    else:  # cut right after the longest caption's end-of-text token
        assert trimmed.shape[1] == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    with torch.no_grad():
        full = adapter.text_features(tokens)
        torch.testing.assert_close(adapter.text_features(trimmed), full, atol=1e-5, rtol=1e-5)
        own = model.encode_text(tokens, normalize=True)
        torch.testing.assert_close(
            adapter.endpoint().embed_text(adapter.text_features(trimmed)), own, atol=1e-5, rtol=0
        )


def test_feature_pass_trims_per_batch_and_keeps_full_length_captions():
    from lightning_chips.features import extract_features

    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT)).eval()
    adapter = resolve_adapter(model)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    long = " ".join(["word"] * 40)  # fills the context: nothing to cut in its batch
    captions = ["a cat", "a dog on a mat", long, "x"]
    tokens = tokenizer(captions)
    assert adapter.trim_tokens(tokens[2:3]).shape[1] == 16
    batches = [{"image": torch.randn(2, 3, 32, 32), "text": tokens[i : i + 2], "id": torch.arange(i, i + 2)}
               for i in (0, 2)]  # fmt: skip
    feats = extract_features(adapter, batches)
    with torch.no_grad():
        expected = torch.cat([model.encode_text(b["text"], normalize=True) for b in batches])
    torch.testing.assert_close(adapter.endpoint().embed_text(feats.text), expected, atol=1e-5, rtol=0)
