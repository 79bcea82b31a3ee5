"""Every CLIP family the adapters support runs end to end with CHIPS (docs/models.md, model families).

For each family of ``tests/test_model_families.py`` (built offline from tiny configs): (1) a fit under
``DataSelectionCallback(CHIPS(...))`` on a ``ScoredSubsetDataModule`` whose pool and target yield pre-tokenized
captions (so no tokenizer is named), training the model with its own loss (InfoNCE, or SigLIP's sigmoid loss for a
model with a logit bias) through the adapter's normalised embeddings; (2) ``score_pool`` (``lightning-chips score``)
over WebDataset shards of string captions, tokenized by a callable word tokenizer in the family's vocabulary that
the module returns from ``get_tokenizer()`` (or that ``score_pool(tokenizer=...)`` is given).
"""

from __future__ import annotations

import zlib

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_chips import DataSelectionCallback, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.adapters import resolve_adapter
from lightning_chips.data.preprocess import MissingTokenizer, model_context_length
from lightning_chips.offline import read_scores, score_pool
from lightning_chips.scoring import CHIPS

from .shards import write_pool
from .test_model_families import FAMILIES, SIGLIP

# The families' token conventions: (start id or None, end-of-text id, pad id, lowest word id, word ids below this).
# They follow the families' own tokenizers (the `_ids` helpers of test_model_families.py): open_clip's BPE ends with
# 49407 (the largest id, where the causal tower pools) and pads with 0; BERT is [CLS] 2, [SEP] 3, [PAD] 0; SigLIP has
# no start token and pads with its end-of-text id; transformers CLIP starts with 98 and ends and pads with 99.
CONVENTIONS = {
    "timm_linear": (49406, 49407, 0, 1, 1000),
    "timm_mlp": (49406, 49407, 0, 1, 1000),
    "hf_text_mlp": (2, 3, 0, 4, 50),
    "siglip_open_clip_linear_image_head": (None, 1, 1, 2, 100),
    "siglip_open_clip": (None, 1, 1, 2, 100),
    "transformers_clip": (98, 99, 99, 3, 90),
    "transformers_siglip": (None, 1, 1, 2, 100),
}
POOL, TARGET, BATCH = 32, 8, 8


class WordIds:
    """A deterministic word tokenizer in a family's vocabulary: each word hashed to an id in ``[low, high)``,
    ``[start] + words + [end]`` cut and padded with ``pad`` to ``context_length`` tokens."""

    def __init__(self, name: str, context_length: int) -> None:
        self.start, self.end, self.pad, self.low, self.high = CONVENTIONS[name]
        self.context_length = context_length
        self.calls = 0

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        self.calls += 1
        head = [] if self.start is None else [self.start]
        room = self.context_length - len(head) - 1
        rows = []
        for text in texts:
            words = [self.low + zlib.crc32(w.encode()) % (self.high - self.low) for w in text.lower().split()][:room]
            row = head + words + [self.end]
            rows.append(row + [self.pad] * (self.context_length - len(row)))
        return torch.tensor(rows, dtype=torch.int64)


class FamilyCLIP(pl.LightningModule):
    """A user LightningModule holding one family's model under ``model``, with no tokenizer: it trains with the
    model's own loss on the adapter's normalised embeddings (InfoNCE, or the sigmoid loss with the logit bias)."""

    def __init__(self, name: str, lr: float = 1e-3) -> None:
        super().__init__()
        build, self.image_size, _, _ = FAMILIES[name]
        self.model = build()
        self.lr = lr
        self.losses: list[str] = []  # the loss of every training step

    def training_step(self, batch, batch_idx):
        adapter = resolve_adapter(self.model)
        ep = adapter.endpoint()
        x, y = adapter.encode_image(batch["image"]), adapter.encode_text(batch["text"])
        logits = ep.scale() * x @ y.T
        if ep.loss == "sigmoid":  # SigLIP: -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z = 1 on pairs, else -1
            signs = 2 * torch.eye(len(x), device=x.device) - 1
            loss = -F.logsigmoid(signs * (logits + ep.logit_bias)).sum() / len(x)
        else:
            labels = torch.arange(len(x), device=x.device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        self.losses.append(ep.loss)
        self.log("train/loss", loss, batch_size=len(x))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


class Seen(pl.Callback):
    """The pool ids of every training batch, by epoch."""

    def __init__(self) -> None:
        self.ids: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, set()).update(batch["id"].tolist())


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def _chips() -> CHIPS:
    return CHIPS(sketch_dim=64, bank_size=16, curvature_samples=64, reference_steps=0)


def _expected_loss(name: str) -> str:
    return "sigmoid" if name in SIGLIP else "infonce"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_fit_with_chips_selection_trains_every_family(name, tmp_path):
    module = FamilyCLIP(name)
    adapter = resolve_adapter(module)
    assert adapter.module is module.model and adapter.endpoint().loss == _expected_loss(name)
    length = model_context_length(module)
    words = WordIds(name, length)  # makes the datasets' token ids; the data module is given no tokenizer
    pool = TwoDomainPairs(POOL, target_fraction=0.3, image_size=module.image_size, tokenizer=words)
    target = TwoDomainPairs(TARGET, target_fraction=1.0, split="val", image_size=module.image_size, tokenizer=words)
    assert pool[0]["text"].dtype == torch.int64 and pool[0]["text"].shape == (length,)
    data = ScoredSubsetDataModule(pool, target, batch_size=BATCH, steps_per_round=2, eval_batch_size=BATCH)
    save_dir = tmp_path / "rounds"
    select = DataSelectionCallback(_chips(), fraction=0.5, every_n_epochs=1, save_dir=str(save_dir), progress=False)
    seen = Seen()
    before = adapter.endpoint().detach()
    _trainer(max_epochs=2, callbacks=[select, seen]).fit(module, datamodule=data)

    assert isinstance(data.collate.tokenizer, MissingTokenizer)  # none named, none needed
    assert len(select.history) == 2 and select.round == 2
    assert module.losses == [_expected_loss(name)] * 4  # 2 epochs x 2 steps, with the model's own loss
    for r in range(2):
        with np.load(save_dir / f"round_{r:04d}.npz") as f:
            assert f["ids"].tolist() == list(range(POOL))  # every pool id once
            assert np.isfinite(f["scores"]).all()
            assert int(f["selected"].sum()) == POOL // 2
            chosen = set(f["ids"][f["selected"]].tolist())
        assert seen.ids[r] <= chosen  # epoch r trained on round r's selection only
    # the last selection is the data module's, and its sampler draws from it
    assert data.selection is select.selection and data.selection.round == 1
    assert set(data.sampler.global_sequence().tolist()) <= set(data.selection.indices.tolist())
    # the scorer ran with the model's loss, and the fit moved every end-point tensor (and the logit bias)
    assert select.scorer.state.endpoint.loss == _expected_loss(name)
    assert ("loss=sigmoid" in select.scorer.summary()) == (name in SIGLIP)
    after = adapter.endpoint().detach()
    for old, new in zip(before.tensors(), after.tensors(), strict=True):
        assert not torch.equal(old, new)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_pool")
    valid = write_pool(root / "pool", num_pairs=16, per_shard=8)
    write_pool(root / "target", num_pairs=8, per_shard=8, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target")  # fmt: skip
    return root, valid


class TokenizingFamilyCLIP(FamilyCLIP):
    """The same module with a tokenizer of its own (``get_tokenizer()``): how ``score_pool`` takes a callable."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.words = WordIds(name, model_context_length(self.model))

    def get_tokenizer(self) -> WordIds:
        return self.words


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_score_runs_chips_over_shards_for_every_family(name, shards, tmp_path):
    """The family's callable tokenizer comes from the model's ``get_tokenizer()``."""
    root, valid = shards
    module = TokenizingFamilyCLIP(name)
    scorer = _chips()
    path = score_pool(module, scorer, str(root / "pool"), str(tmp_path / "scores"), target=str(root / "target"),
                      batch_size=BATCH, num_workers=0, pool_sample=None, trainer=_trainer(),
                      context_length=module.words.context_length)  # fmt: skip
    scores = read_scores(path)
    assert module.words.calls > 0  # the captions were tokenized in the family's vocabulary
    assert scores["ids"].tolist() == sorted(valid)  # every valid pool uid, once
    assert np.isfinite(scores["scores"]).all() and scores["method"] == "CHIPS"
    assert scorer.state.endpoint.loss == _expected_loss(name)
    assert ("loss=sigmoid" in scorer.summary()) == (name in SIGLIP)


@pytest.mark.slow
def test_score_pool_takes_a_callable_tokenizer_and_a_different_one_is_another_run(shards, tmp_path):
    """A callable tokenizer passed to ``score_pool`` tokenizes the captions; the tokenizer is part of the run's
    identity (through the ids it gives fixed probe captions), so resuming with one that tokenizes differently is
    refused instead of mixing scores of two tokenizations."""
    root, valid = shards
    module = FamilyCLIP("transformers_siglip")
    length = model_context_length(module)
    words = WordIds("transformers_siglip", length)

    def score(tokenizer) -> str:
        return score_pool(module, _chips(), str(root / "pool"), str(tmp_path / "scores"), target=str(root / "target"),
                          batch_size=BATCH, num_workers=0, pool_sample=None, trainer=_trainer(), tokenizer=tokenizer,
                          context_length=length)  # fmt: skip

    assert read_scores(score(words))["ids"].tolist() == sorted(valid) and words.calls > 0
    score(WordIds("transformers_siglip", length))  # another instance, the same tokenization: resumes
    other = WordIds("transformers_siglip", length)
    other.low += 1  # every word gets another id
    with pytest.raises(ValueError, match="another run"):
        score(other)
