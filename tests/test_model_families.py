"""Every CLIP family a domain adapter starts from reaches its end point exactly (docs/models.md, model families).

For each family, built offline from a tiny config: (a) the adapter's normalised embeddings are the model's own,
padded caption batches of different lengths included (so the padding trim is exercised); (b) the closed-form
per-sample end-point gradients equal ``torch.func`` autograd of the per-sample bank loss (InfoNCE, or SigLIP's
sigmoid loss when the model has a logit bias) in float64, and autograd through the model's live parameters;
(c) ``endpoint()`` holds the live parameters, and a logit bias exactly when the model has one. SigLIP's image
towers end in a residual MLP, ``r + mlp(norm(r))``: their end point is the MLP's last layer, with features ``[h, r]``
(``EndPoint.image_residual``).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import types

import lightning.pytorch as pl
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_chips.adapters import OpenCLIPAdapter, UnsupportedModelError, resolve_adapter
from lightning_chips.endpoint import TENSOR_FIELDS, EndPoint
from lightning_chips.functional.bank import endpoint_per_sample_grads

from .conftest import TINY_TEXT

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red circle", "fluorescence micrograph of a dividing cell nucleus", "x", ""]
EMBED = 16
# timm model kwargs that shrink any registered ViT / ConvNeXt to a few thousand parameters.
TINY_TIMM = {
    "vit": {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32, "patch_size": 8},
    "convnext": {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)},
}


# -- model builders (offline: nothing is downloaded) ----------------------------------------------------------------
def _open_clip(cfg: dict, custom_text: bool = False, hf_config=None) -> nn.Module:
    """An open_clip model whose timm trunk is tiny and whose Hugging Face text config is ``hf_config``."""
    name = cfg["vision_cfg"].get("timm_model_name", "")
    tiny = TINY_TIMM["convnext" if "convnext" in name else "vit"]
    create = timm.create_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timm, "create_model", lambda model_name, **kw: create(model_name, **{**kw, **tiny}))
        if hf_config is not None:  # open_clip reads the config by name from the hub: hand it the tiny one
            mp.setattr(open_clip.hf_model, "AutoConfig", types.SimpleNamespace(from_pretrained=lambda _: hf_config))
        return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**copy.deepcopy(cfg))


def _timm_cfg(name: str = "vit_base_patch16_224", image_size: int = 32, **vision) -> dict:
    vision_cfg = {"image_size": image_size, "timm_model_name": name, "timm_model_pretrained": False, **vision}
    return {"embed_dim": EMBED, "vision_cfg": vision_cfg, "text_cfg": dict(TINY_TEXT)}


def _bert_config():
    return transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=24, pad_token_id=0,
    )  # fmt: skip


def _biomedclip_shaped(pooler: str = "cls_last_hidden_state_pooler", proj: str = "mlp") -> nn.Module:
    """BiomedCLIP's shape: a timm ViT image tower (linear projection) and a BERT text tower with an MLP projection."""
    cfg = _timm_cfg(timm_pool="", timm_proj="linear")
    cfg["text_cfg"] = {"hf_model_name": "tiny-bert", "hf_model_pretrained": False, "hf_proj_type": proj,
                       "hf_pooler_type": pooler, "context_length": 20}  # fmt: skip
    return _open_clip(cfg, custom_text=True, hf_config=_bert_config())


def _siglip_cfg(timm_proj) -> dict:
    """open_clip's SigLIP configs (ViT-B-16-SigLIP.json), shrunk."""
    return {
        "embed_dim": 32 if timm_proj == "none" else EMBED,  # 'none': the trunk's width is the embedding
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "vit_base_patch16_siglip_224",
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": timm_proj},
        "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    }  # fmt: skip


def _siglip_open_clip(timm_proj) -> nn.Module:
    cfg = _siglip_cfg(timm_proj)
    cfg.pop("custom_text")
    return _open_clip(cfg, custom_text=True)


def _hf_clip(legacy_eos: bool = False):
    """transformers CLIPModel; token 98 = start, 99 = end-of-text (and padding, as HF's CLIP tokenizers pad)."""
    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 98,
            "eos_token_id": 2 if legacy_eos else 99, "pad_token_id": 1}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED))


def _hf_siglip():
    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 12}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    return transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))


# -- token batches: padded, captions of different lengths -----------------------------------------------------------
def _ids(lengths, start, end, pad, total, low, high, seed=0):
    """Rows ``[start] + words + [end]`` padded with ``pad`` to ``total`` columns."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(low, high, (n,), generator=g).tolist()
        row = ([start] if start is not None else []) + words + [end]
        rows.append(row + [pad] * (total - len(row)))
    return torch.tensor(rows)


def _open_clip_tokens():
    return open_clip.tokenizer.SimpleTokenizer(context_length=16)(CAPTIONS)


def _bert_tokens():  # [CLS] = 2, [SEP] = 3, [PAD] = 0
    return _ids([3, 12, 1, 0], start=2, end=3, pad=0, total=20, low=4, high=50)


def _siglip_tokens():  # SigLIP's tokenizers pad with the end-of-text id (1) to the full context
    return _ids([3, 9, 1, 0], start=None, end=1, pad=1, total=12, low=2, high=100)


def _hf_clip_tokens(legacy_eos: bool = False):
    if legacy_eos:  # the legacy rule pools the largest id: end-of-text 99, padding 0 (open_clip's tokenizer)
        return _ids([3, 10, 1, 0], start=98, end=99, pad=0, total=16, low=3, high=90)
    return _ids([3, 10, 1, 0], start=98, end=99, pad=99, total=16, low=3, high=90)


# -- the families -------------------------------------------------------------------------------------------------
# name: (builder, image size, tokens, positions the trim keeps, or None when every position is kept)
FAMILIES = {
    "timm_linear": (lambda: _open_clip(_timm_cfg(timm_pool="", timm_proj="linear", timm_proj_bias=True)), 32,
                    _open_clip_tokens, "eot"),
    "timm_mlp": (lambda: _open_clip(_timm_cfg(timm_pool="avg", timm_proj="mlp")), 32, _open_clip_tokens, "eot"),
    "hf_text_mlp": (_biomedclip_shaped, 32, _bert_tokens, 14),
    "siglip_open_clip_linear_image_head": (lambda: _siglip_open_clip(timm_proj=None), 32, _siglip_tokens, None),
    "siglip_open_clip": (lambda: _siglip_open_clip(timm_proj="none"), 32, _siglip_tokens, None),
    "transformers_clip": (_hf_clip, 32, _hf_clip_tokens, 12),
    "transformers_siglip": (_hf_siglip, 32, _siglip_tokens, None),
}  # fmt: skip
SIGLIP = {"siglip_open_clip_linear_image_head", "siglip_open_clip", "transformers_siglip"}
RESIDUAL = {"siglip_open_clip", "transformers_siglip"}  # image heads r + mlp(norm(r))


def _perturbed(model: nn.Module) -> nn.Module:
    """Move every parameter off its init (zero biases, identity-like inits) so a wrong transpose or a dropped bias
    cannot pass."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a model output from ``get_*_features`` (the embedding is its pooler output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _own_embeddings(model: nn.Module, images, tokens, attention_mask=None):
    """The model's own normalised embeddings, through its own API."""
    if isinstance(model, transformers.PreTrainedModel):
        image = _pooled(model.get_image_features(pixel_values=images))
        text = _pooled(model.get_text_features(input_ids=tokens, attention_mask=attention_mask))
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


# -- (a) embeddings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_embeddings_are_the_models_own(name):
    build, size, make_tokens, kept = FAMILIES[name]
    model = _perturbed(build())
    adapter = resolve_adapter(model)
    images, tokens = torch.randn(4, 3, size, size), make_tokens()
    trimmed = adapter.trim_tokens(tokens)
    torch.testing.assert_close(trimmed, tokens[:, : trimmed.shape[1]], rtol=0, atol=0)  # a prefix
    if kept is None:
        assert trimmed.shape == tokens.shape
    else:
        expected = int(tokens.argmax(-1).max()) + 1 if kept == "eot" else kept
        assert trimmed.shape[1] == expected < tokens.shape[1]
    with torch.no_grad():
        own_image, own_text = _own_embeddings(model, images, tokens)
        torch.testing.assert_close(adapter.encode_image(images), own_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.encode_text(tokens), own_text, atol=1e-5, rtol=0)
        ep = adapter.endpoint()
        torch.testing.assert_close(ep.embed_text(adapter.text_features(tokens)), own_text, atol=1e-5, rtol=0)
        assert adapter.image_features(images).shape == (4, ep.image_feature_dim)
        assert ep.image_residual == (name in RESIDUAL)
        assert ep.image_feature_dim == ep.image_dim + (ep.embed_dim if name in RESIDUAL else 0)


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_transformers_clip_pools_the_end_of_text_as_the_model_does(legacy_eos):
    """Both of CLIPTextTransformer's pooling rules (first end-of-text id; largest id for legacy configs), with and
    without the tokenizer's attention mask: the causal tower makes the mask irrelevant to the pooled token."""
    model = _perturbed(_hf_clip(legacy_eos))
    adapter = resolve_adapter(model)
    tokens = _hf_clip_tokens(legacy_eos)
    eot = tokens.argmax(-1) if legacy_eos else (tokens == 99).int().argmax(-1)
    mask = (torch.arange(tokens.shape[1])[None, :] <= eot[:, None]).long()  # what the tokenizer returns
    assert adapter.trim_tokens(tokens).shape[1] == int(eot.max()) + 1
    with torch.no_grad():
        for attention_mask in (None, mask):
            _, own = _own_embeddings(model, torch.randn(1, 3, 32, 32), tokens, attention_mask)
            torch.testing.assert_close(adapter.encode_text(tokens), own, atol=1e-5, rtol=0)


TIMM_HEADS = {  # open_clip TimmModel heads beyond the two families: (vision_cfg, image size)
    "linear_token_pool_no_bias": ({"timm_pool": "", "timm_proj": "linear"}, 32),
    "mlp_token_pool_bias": ({"timm_pool": "", "timm_proj": "mlp", "timm_proj_bias": True}, 32),
    "trunk_classifier_after_map_pool": ({"timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map",
                                         "timm_proj": None}, 32),
    "trunk_classifier_after_avg_pool": ({"timm_pool": "avg", "timm_proj": None}, 32),
    "abs_attention_pool_projection": ({"timm_model_name": "convnext_atto", "timm_pool": "abs_attn",
                                       "timm_proj": "none"}, 64),
    "rot_attention_pool_then_linear": ({"timm_model_name": "convnext_atto", "timm_pool": "rot_attn",
                                        "timm_proj": "linear"}, 64),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TIMM_HEADS))
def test_every_timm_head_that_ends_in_a_linear_map_is_exact(name):
    vision, size = TIMM_HEADS[name]
    model = _perturbed(_open_clip(_timm_cfg(image_size=size, **vision)))
    adapter = resolve_adapter(model)
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.encode_image(images), model.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "pooler, proj, kept",
    [("cls_pooler", "linear", 14), ("mean_pooler", "mlp", 14), ("cls_last_hidden_state_pooler", "linear", 14)],
)
def test_every_hf_pooler_trims_exactly(pooler, proj, kept):
    """open_clip's Hugging Face poolers that read only the non-padding tokens (class token, with or without BERT's
    pooler layer, and the masked mean) cut each batch after its longest caption; the features do not change."""
    model = _perturbed(_biomedclip_shaped(pooler, proj))
    adapter = resolve_adapter(model)
    tokens = _bert_tokens()
    assert adapter.trim_tokens(tokens).shape[1] == kept
    with torch.no_grad():
        full = adapter.text_features(tokens)
        torch.testing.assert_close(adapter.text_features(adapter.trim_tokens(tokens)), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.encode_text(tokens), model.encode_text(tokens, normalize=True), atol=1e-5,
                                   rtol=0)  # fmt: skip


def test_hf_max_pooler_keeps_every_position():
    """open_clip 3.x's max pooler fills the attended positions (and fails on its long mask): never trimmed."""
    model = _biomedclip_shaped("max_pooler", "mlp")
    tokens = _bert_tokens()
    assert resolve_adapter(model).trim_tokens(tokens).shape == tokens.shape


# -- (b) per-sample gradients --------------------------------------------------------------------------------------
def _reference_loss(ep: EndPoint, h_v, h_t, bank_x, bank_y):
    """The per-sample bank loss of one pair (lightning_chips.functional.endpoint's definitions)."""
    x, y = ep.embed_image(h_v[None])[0], ep.embed_text(h_t[None])[0]
    s = ep.logit_scale.exp()
    pos, a, b = s * (x @ y), s * (bank_y @ x), s * (bank_x @ y)
    if ep.logit_bias is None:  # InfoNCE: half the row and half the column of the softmax cross-entropy
        first = torch.logsumexp(torch.cat([pos[None], a]), 0) - pos
        second = torch.logsumexp(torch.cat([pos[None], b]), 0) - pos
        return 0.5 * (first + second)
    beta = ep.logit_bias  # SigLIP: the positive once, half of the negatives of its row and of its column
    return F.softplus(-(pos + beta)) + 0.5 * F.softplus(a + beta).sum() + 0.5 * F.softplus(b + beta).sum()


def _names(ep: EndPoint) -> list[str]:
    return [name for name in TENSOR_FIELDS if getattr(ep, name) is not None]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_closed_form_per_sample_grads_match_autograd(name):
    build, size, make_tokens, _ = FAMILIES[name]
    model = _perturbed(build()).double()
    adapter = resolve_adapter(model)
    n, m = 5, 7
    images = torch.randn(n + m, 3, size, size, dtype=torch.float64)
    tokens = make_tokens()
    tokens = tokens[torch.arange(n + m) % len(tokens)]
    with torch.no_grad():
        h_v, h_t = adapter.image_features(images), adapter.text_features(adapter.trim_tokens(tokens))
        snapshot = adapter.endpoint().detach()
        bank_x, bank_y = snapshot.embed_image(h_v[n:]), snapshot.embed_text(h_t[n:])  # constant negatives
    h_v, h_t = h_v[:n], h_t[:n]
    assert snapshot.loss == ("sigmoid" if name in SIGLIP else "infonce")

    closed = endpoint_per_sample_grads(h_v, h_t, snapshot, bank_x, bank_y).flatten()

    # torch.func: per-sample grad of the reference loss w.r.t. the end-point tensors, in EndPoint.tensors() order.
    names = _names(snapshot)

    def loss(tensors, hv, ht):
        return _reference_loss(snapshot.replace(**dict(zip(names, tensors, strict=True))), hv, ht, bank_x, bank_y)

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(tuple(snapshot.tensors()), h_v, h_t)
    reference = torch.cat([g.reshape(n, -1) for g in per_sample], dim=1)
    assert closed.shape == reference.shape
    torch.testing.assert_close(closed, reference, atol=1e-10, rtol=0)

    # ... and through the model's live parameters: the end point's tensors are (views of) its parameters.
    params = {id(p) for p in model.parameters()}
    for i in (0, n - 1):
        live = adapter.endpoint()
        bases = [t if t._base is None else t._base for t in live.tensors()]
        assert all(id(base) in params for base in bases)
        grads = torch.autograd.grad(_reference_loss(live, h_v[i], h_t[i], bank_x, bank_y), bases)
        flat = [(g.T if t.dim() == 2 and t._base is not None else g.reshape(t.shape)).reshape(-1)
                for g, t in zip(grads, live.tensors(), strict=True)]  # fmt: skip
        torch.testing.assert_close(closed[i], torch.cat(flat), atol=1e-10, rtol=0)


# -- (c) live parameters and the logit bias ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_endpoint_is_live_and_has_a_logit_bias_exactly_for_siglip(name):
    build, size, make_tokens, _ = FAMILIES[name]
    model = _perturbed(build())
    adapter = resolve_adapter(model)
    before = adapter.endpoint().detach()
    assert (before.logit_bias is not None) == (name in SIGLIP)
    if name in SIGLIP:
        assert adapter.endpoint().logit_bias.data_ptr() == model.logit_bias.data_ptr()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    image, text = _own_embeddings(model, torch.randn(4, 3, size, size), make_tokens())
    loss = (image * torch.randn_like(image)).sum() + (text * torch.randn_like(text)).sum() + model.logit_scale.sum()
    if name in SIGLIP:
        loss = loss + model.logit_bias.sum()
    loss.backward()
    optimizer.step()
    after = adapter.endpoint()
    for field, old, new in zip(_names(before), before.tensors(), after.tensors(), strict=True):
        assert not torch.equal(old, new), f"{field} did not follow the optimiser step"


# -- resolution ----------------------------------------------------------------------------------------------------
class _Holder(pl.LightningModule):
    def __init__(self, **children):
        super().__init__()
        for key, child in children.items():
            setattr(self, key, child)


def test_transformers_and_timm_clips_resolve_under_a_lightning_module():
    hf, oc = _hf_clip(), _open_clip(_timm_cfg(timm_pool="", timm_proj="linear"))
    assert resolve_adapter(_Holder(model=hf)).module is hf
    assert resolve_adapter(_Holder(clip=oc)).module is oc
    assert resolve_adapter(_Holder(encoder=hf, head=nn.Linear(2, 2))).module is hf  # the one CLIP child
    assert resolve_adapter(_Holder(model=oc, teacher=hf)).module is oc  # `model` first
    assert type(resolve_adapter(hf)).__name__ == "TransformersCLIPAdapter"
    with pytest.raises(UnsupportedModelError, match="several CLIPs.*`student`.*`teacher`"):
        resolve_adapter(_Holder(student=oc, teacher=hf))


def test_siglip_image_towers_end_point_is_the_residual_mlps_last_layer():
    """SigLIP's attention-pool head ends in a residual MLP, r + mlp(norm(r)): the end point is the MLP's fc2 (live),
    the features are [h, r], and the embedding is W^T h + b + r (held directly or under a LightningModule)."""
    oc, hf = _perturbed(_siglip_open_clip(timm_proj="none")), _perturbed(_hf_siglip())
    for model, fc2 in ((oc, oc.visual.trunk.attn_pool.mlp.fc2), (hf, hf.vision_model.head.mlp.fc2)):
        adapter = resolve_adapter(_Holder(siglip=model))
        assert adapter.module is model
        ep = adapter.endpoint()
        assert ep.image_proj._base is fc2.weight and ep.image_bias is fc2.bias and ep.image_residual
        with torch.no_grad():
            features = adapter.image_features(torch.randn(2, 3, 32, 32))
            h, r = features[:, : ep.image_dim], features[:, ep.image_dim :]
            torch.testing.assert_close(ep.project_image(features), fc2(h) + r, atol=1e-6, rtol=0)
            assert r.abs().sum() > 0  # the residual is a real per-sample term


def test_siglip_shaped_open_clip_with_a_linear_image_head_has_the_text_and_bias_end_point():
    """The SigLIP text tower (last-token pooling, bidirectional, biased projection) keeps every position."""
    model = _siglip_open_clip(timm_proj=None)
    adapter = resolve_adapter(model)
    assert isinstance(adapter, OpenCLIPAdapter)
    ep = adapter.endpoint()
    assert ep.text_proj._base is model.text.text_projection.weight and ep.text_bias is model.text.text_projection.bias
    assert ep.image_proj._base is model.visual.trunk.head.weight and ep.logit_bias is model.logit_bias
    assert ep.loss == "sigmoid"


def test_hf_tower_with_an_identity_projection_is_refused():
    model = _biomedclip_shaped()
    model.text.proj = nn.Identity()
    with pytest.raises(UnsupportedModelError, match="does not end in a linear map"):
        resolve_adapter(model)


def test_resolution_never_imports_transformers():
    """Without transformers, open_clip models resolve and nothing imports it (or the transformers adapters)."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import open_clip, torch\n"
        "from lightning_chips.adapters import UnsupportedModelError, resolve_adapter\n"
        "cfg = {'embed_dim': 8, 'vision_cfg': {'image_size': 16, 'layers': 1, 'width': 16, 'head_width': 8,"
        " 'patch_size': 8}, 'text_cfg': {'context_length': 8, 'vocab_size': 100, 'width': 16, 'heads': 2,"
        " 'layers': 1}}\n"
        "print(resolve_adapter(open_clip.CLIP(**cfg)))\n"
        "try:\n    resolve_adapter(torch.nn.Linear(2, 2))\nexcept UnsupportedModelError:\n    print('refused')\n"
        "print(sys.modules['transformers'], 'lightning_chips.transformers_adapters' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["OpenCLIPAdapter(CLIP)", "refused", "None False"]
