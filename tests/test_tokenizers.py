"""The tokenizer is needed only when captions are strings, and it comes from the model with the model's context length.

A user LightningModule without a tokenizer trains on token ids; a tokenizer or ``context_length`` that disagrees
with the model's context length is an error before the first training step; ``lightning-chips score`` takes
``--tokenizer`` / ``--context_length``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.adapters import EndPoint, resolve_adapter
from lightning_chips.cli import main
from lightning_chips.data import PairCollate, TwoDomainDataModule
from lightning_chips.data.preprocess import (
    MissingTokenizer,
    TransformersTokenizer,
    model_context_length,
    resolve_tokenizer,
)
from lightning_chips.metrics import PromptEncoder
from lightning_chips.scoring import CHIPS

from .conftest import TINY_VIT
from .shards import write_pool

CONTEXT = 16


class TokenCLIP(pl.LightningModule):
    """A user CLIP implementing SupportsEndPoint, with no tokenizer: mean token embeddings (pad id 0 left out) and a
    linear image tower, linear heads, InfoNCE. It says its context length (``context_length``)."""

    def __init__(self, vocab_size: int = 49408, width: int = 16, embed_dim: int = 8, image_size: int = 16,
                 context_length: int = CONTEXT) -> None:  # fmt: skip
        super().__init__()
        self.context_length, self.image_size = context_length, image_size
        self.tokens = nn.Embedding(vocab_size, width)
        self.pixels = nn.Linear(3 * image_size * image_size, width)
        self.image_head = nn.Linear(width, embed_dim, bias=False)
        self.text_head = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.steps = 0

    def image_features(self, images):
        return torch.tanh(self.pixels(F.adaptive_avg_pool2d(images, self.image_size).flatten(1)))

    def text_features(self, tokens):
        assert tokens.dtype == torch.int64 and tokens.shape[-1] <= self.context_length
        mask = (tokens != 0).float()[..., None]
        return (self.tokens(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def endpoint(self):
        return EndPoint(self.image_head.weight.T, self.text_head.weight.T, self.logit_scale)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        ep = self.endpoint()
        x, y = ep.embed_image(self.image_features(batch["image"])), ep.embed_text(self.text_features(batch["text"]))
        logits = ep.scale() * x @ y.T
        labels = torch.arange(len(x))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        self.log("train/loss", loss, batch_size=len(x))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TokenPairs(Dataset):
    """Pairs whose captions are token ids (a list of ints, or a LongTensor), padded with 0 to ``length``."""

    def __init__(self, n: int, *, length: int = CONTEXT, as_list: bool = False, strings: bool = False,
                 ragged: bool = False) -> None:  # fmt: skip
        self.n, self.length, self.as_list, self.strings, self.ragged = n, length, as_list, strings, ragged

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 16, 16, generator=g)
        if self.strings:
            return {"image": image, "text": f"a picture number {i}", "id": i}
        used = 3 + i % 4
        tokens = torch.zeros(used if self.ragged else self.length, dtype=torch.int64)
        tokens[:used] = torch.randint(1, 1000, (used,), generator=g)
        return {"image": image, "text": tokens.tolist() if self.as_list else tokens, "id": i}


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def test_a_user_module_without_a_tokenizer_fits_with_selection_on_token_ids(tmp_path):
    model = TokenCLIP()
    data = ScoredSubsetDataModule(TokenPairs(64, as_list=True), TokenPairs(12), batch_size=8, steps_per_round=3)
    select = DataSelectionCallback(CHIPS(sketch_dim=32, bank_size=16, curvature_samples=32), fraction=0.5,
                                   every_n_epochs=1, save_dir=str(tmp_path), progress=False)  # fmt: skip
    _trainer(max_epochs=2, callbacks=[select]).fit(model, datamodule=data)
    assert model.steps == 6 and len(select.history) == 2
    assert len(data.selection.ids) == 32
    assert isinstance(data.collate.tokenizer, MissingTokenizer)  # none named, none needed
    assert data.collate.context_length == CONTEXT


def test_string_captions_without_a_tokenizer_fail_at_setup_saying_what_to_pass():
    model = TokenCLIP()
    data = ScoredSubsetDataModule(TokenPairs(16, strings=True), batch_size=8, steps_per_round=1)
    with pytest.raises(ValueError, match=r"pool set's captions are strings\. TokenCLIP has no tokenizer.*`tokenizer=`"):
        _trainer(max_steps=1).fit(model, datamodule=data)
    assert model.steps == 0
    # the same module with a named tokenizer at its context length trains on the strings
    data = ScoredSubsetDataModule(TokenPairs(16, strings=True), batch_size=8, steps_per_round=1,
                                  tokenizer="ViT-B-32", context_length=CONTEXT)  # fmt: skip
    _trainer(max_steps=1).fit(model, datamodule=data)
    assert model.steps == 1


def test_pre_tokenized_captions_are_stacked_unpadded_and_checked_against_the_context_length():
    items = [TokenPairs(4)[i] for i in range(4)]
    batch = PairCollate(None, None, CONTEXT)(items)
    assert batch["text"].shape == (4, CONTEXT) and batch["text"].dtype == torch.int64
    listed = PairCollate(None, None, CONTEXT)([TokenPairs(4, as_list=True)[i] for i in range(4)])
    assert torch.equal(listed["text"], batch["text"])
    with pytest.raises(ValueError, match=r"different lengths \(id 0: \(3,\), id 1: \(4,\).*pad them in the dataset"):
        PairCollate(None, None, CONTEXT)([TokenPairs(4, ragged=True)[i] for i in range(4)])
    with pytest.raises(ValueError, match=r"Captions of 20 tokens \(the dataset gives\) but the model's context length"):
        PairCollate(None, None, CONTEXT)([TokenPairs(2, length=20)[i] for i in range(2)])
    features = [{"image": torch.zeros(3, 2, 2), "text": torch.randn(5), "id": i} for i in range(2)]
    assert PairCollate(None, None, CONTEXT)(features)["text"].shape == (2, 5)  # precomputed features: no check
    missing = MissingTokenizer("TokenCLIP has no tokenizer; pass one.")
    with pytest.raises(ValueError, match="TokenCLIP has no tokenizer"):
        PairCollate(missing)([TokenPairs(1, strings=True)[0]])


class Counting(OpenCLIPModule):
    def training_step(self, batch, batch_idx):
        raise AssertionError("no training step may run")


def test_a_tokenizer_that_disagrees_with_the_models_context_length_fails_before_the_first_step():
    """The tiny model has 16 positions; ViT-B-32's tokenizer gives 77 tokens."""
    model = Counting(model_config=TINY_VIT)
    pool = TwoDomainPairs(16)
    data = ScoredSubsetDataModule(pool, batch_size=8, steps_per_round=1, tokenizer="ViT-B-32")
    with pytest.raises(ValueError, match=r"tokenizer 'ViT-B-32' gives 77 tokens.*takes 16.*`context_length=16`"):
        _trainer(max_steps=1).fit(model, datamodule=data)
    data = ScoredSubsetDataModule(pool, batch_size=8, steps_per_round=1, context_length=20)
    with pytest.raises(ValueError, match=r"`context_length=20` disagrees with the context length of the model "
                       r"Counting \(16 tokens\)"):  # fmt: skip
        _trainer(max_steps=1).fit(model, datamodule=data)
    with pytest.raises(ValueError, match="gives 77 tokens per caption but the model Counting takes 16"):
        _trainer(max_steps=1).fit(model, datamodule=TwoDomainDataModule(32, 8, 8, batch_size=8, tokenizer="ViT-B-32"))
    user = TokenCLIP()  # a user module: its `context_length` is the model's
    with pytest.raises(ValueError, match="gives 77 tokens per caption but the model TokenCLIP takes 16"):
        resolve_tokenizer("ViT-B-32", None, user, required=False)
    assert resolve_tokenizer("ViT-B-32", CONTEXT, user)(["a cat"]).shape == (1, CONTEXT)
    # a callable that does not say its length is checked on the batch it makes
    data = ScoredSubsetDataModule(TokenPairs(8, strings=True), batch_size=8, steps_per_round=1,
                                  tokenizer=lambda texts: torch.ones(len(texts), 30, dtype=torch.int64))  # fmt: skip
    with pytest.raises(ValueError, match=r"Captions of 30 tokens \(the tokenizer gives\).*context length is 16"):
        _trainer(max_steps=1).fit(user, datamodule=data)
    assert user.steps == 0


def _tiny_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "cat": 3, "dog": 4, "photo": 5, "of": 6}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]")


class HoldsTransformers(pl.LightningModule):
    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_transformers_models_own_tokenizer_pads_to_its_max_position_embeddings(family):
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=12)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    if family == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                               projection_dim=8))  # fmt: skip
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    module = HoldsTransformers(model, _tiny_word_tokenizer())
    assert model_context_length(module) == 12
    tokenizer = resolve_tokenizer(None, None, module)
    assert isinstance(tokenizer, TransformersTokenizer) and tokenizer.context_length == 12
    assert tokenizer(["a cat", "a photo of a dog"]).tolist() == [[2, 3] + [0] * 10, [2, 5, 6, 2, 4] + [0] * 7]
    with pytest.raises(ValueError, match=r"`context_length=77` disagrees with the context length of the model"):
        resolve_tokenizer(None, 77, module)
    # a processor holding the tokenizer works the same
    processor = type("Processor", (), {"tokenizer": module.tokenizer})()
    assert resolve_tokenizer(processor, None, module)(["a dog"]).shape == (1, 12)


def test_prompts_without_a_tokenizer_are_a_clear_error():
    model = TokenCLIP()
    tokenizer = resolve_tokenizer(None, None, model, required=False)
    encode = PromptEncoder(resolve_adapter(model), tokenizer)
    with pytest.raises(ValueError, match=r"Embedding the prompts \('a cat', 'a dog'\) needs a tokenizer\. TokenCLIP "
                       "has no tokenizer"):  # fmt: skip
        encode(["a cat", "a dog"])
    with pytest.raises(ValueError, match="TokenCLIP has no tokenizer"):
        resolve_tokenizer(None, None, model)  # required (the default): the error itself
    encode = PromptEncoder(resolve_adapter(model), resolve_tokenizer("ViT-B-32", CONTEXT, model))
    assert encode(["a cat", "a dog"]).shape == (2, 8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_pool")
    write_pool(root / "pool", num_pairs=16, per_shard=8)
    return root


def _score(shards, output, *extra) -> list[str]:
    return ["score", "--pool", str(shards / "pool"), "--output", str(output), "--model",
            "tests.test_tokenizers.TokenCLIP", "--scorer", "clipscore", "--num_workers", "0", "--batch_size", "8",
            "--pool_sample", "null", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            *extra]  # fmt: skip


def _one_line_error(capsys, args, *words) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lightning-chips score: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]


def test_score_takes_tokenizer_and_context_length_from_the_command_line(shards, tmp_path, capsys):
    output = tmp_path / "scores"
    _one_line_error(capsys, _score(shards, output), "TokenCLIP has no tokenizer", "`--tokenizer`",
                    "`--context_length 16`")  # fmt: skip
    _one_line_error(capsys, _score(shards, output, "--tokenizer", "ViT-B-32"), "'ViT-B-32' gives 77 tokens",
                    "takes 16", "`--context_length 16`")  # fmt: skip
    _one_line_error(capsys, _score(shards, output, "--tokenizer", "ViT-B-32", "--context_length", "20"),
                    "`--context_length 20` disagrees", "(16 tokens)")  # fmt: skip
    assert not (output / "scores.npz").exists()
    main(_score(shards, output, "--tokenizer", "ViT-B-32", "--context-length", "16"))
    import numpy as np

    with np.load(output / "scores.npz") as f:
        assert len(f["ids"]) == 16 and np.isfinite(f["scores"]).all()
