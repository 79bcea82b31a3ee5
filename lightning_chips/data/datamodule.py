"""``TwoDomainDataModule``: the built-in default data as a LightningDataModule."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_chips.data.builtin import TwoDomainPairs
from lightning_chips.data.preprocess import model_image_input, resolve_tokenizer

__all__ = ["TwoDomainDataModule"]


class TwoDomainDataModule(LightningDataModule):
    """The built-in two-domain image-caption data (:class:`~lightning_chips.data.builtin.TwoDomainPairs`).

    ``train``: a pool of ``num_train`` pairs, a ``target_fraction`` of them from the shifted target domain and a
    ``noise_fraction`` with mismatched captions. ``val`` / ``test``: ``num_val`` / ``num_test`` clean pairs of
    the target domain (``eval_target_fraction=1.0``) from disjoint splits. Batches are dicts
    ``{"image", "text" (token ids), "id", "label", "domain", "noisy"}``.

    The tokenizer and the image size follow the attached model when it has a tokenizer (``get_tokenizer()``, as
    :class:`~lightning_chips.models.OpenCLIPModule` has; see :func:`~lightning_chips.data.preprocess.
    resolve_tokenizer`) and ``image_size``, unless given here; a ``tokenizer`` or ``context_length`` that disagrees
    with the model's context length is an error at setup.

    Args:
        num_train: pool size.
        num_val: validation pairs.
        num_test: test pairs.
        target_fraction: share of target-domain pairs in the pool.
        eval_target_fraction: share of target-domain pairs in the validation and test sets.
        noise_fraction: share of pool pairs whose caption belongs to another sample.
        image_size: image side; ``None`` takes the model's ``image_size`` (32 without a model).
        batch_size: per-device batch size.
        num_workers: dataloader workers.
        seed: seed of the data (the same seed gives the same pairs).
        tokenizer: an open_clip model name whose tokenizer to use; ``None`` takes the model's (a model without
            one needs this: the captions are strings).
        context_length: tokenizer context length; ``None`` takes the model's.

    Example::

        >>> dm = TwoDomainDataModule(num_train=64, num_val=16, batch_size=8, context_length=16)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape, batch["text"].shape
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 16]))
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 1000,
        num_test: int = 2000,
        *,
        target_fraction: float = 0.2,
        eval_target_fraction: float = 1.0,
        noise_fraction: float = 0.0,
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: str | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
        if context_length is not None and context_length < 2:
            raise ValueError(f"`context_length` must be >= 2 (start and end tokens), got {context_length}.")
        for name, value in (
            ("target_fraction", target_fraction),
            ("eval_target_fraction", eval_target_fraction),
            ("noise_fraction", noise_fraction),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
        self.save_hyperparameters()
        self.train_set: TwoDomainPairs | None = None
        self.val_set: TwoDomainPairs | None = None
        self.test_set: TwoDomainPairs | None = None

    def _dataset(self, num_samples: int, split: str, target_fraction: float, noise: float) -> TwoDomainPairs:
        hp = self.hparams
        module = self.trainer.lightning_module if self.trainer is not None else None
        image_size = hp.image_size or getattr(module, "image_size", None) or 32
        return TwoDomainPairs(
            num_samples,
            target_fraction=target_fraction,
            noise_fraction=noise,
            image_size=int(image_size),
            split=split,
            seed=hp.seed,
            tokenizer=resolve_tokenizer(hp.tokenizer, hp.context_length, module),
            transform=model_image_input(module),
        )

    @override
    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and self.train_set is None:
            self.train_set = self._dataset(hp.num_train, "train", hp.target_fraction, hp.noise_fraction)
        if stage in ("fit", "validate") and self.val_set is None:
            self.val_set = self._dataset(hp.num_val, "val", hp.eval_target_fraction, 0.0)
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = self._dataset(hp.num_test, "test", hp.eval_target_fraction, 0.0)

    def _loader(self, dataset: TwoDomainPairs | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call `setup()` (the Trainer does) before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
