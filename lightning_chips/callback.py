"""``DataSelectionCallback``: score the pool, select, and re-select during CLIP continual pre-training.

The callback owns hooks, schedule, state and round files; the round itself (target, pool sample, prepare, score,
gathers, skipped samples) is :func:`lightning_chips.engine.run_round`, which ``lightning-chips score`` shares.

One module (over 500 lines) because it is one thing: the callback, its argument checks, its round bookkeeping
(selection, round file, logged metrics, summary line) and its checkpoint state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_chips.adapters import CLIPAdapter, resolve_adapter
from lightning_chips.data.checks import SkippedSample
from lightning_chips.data.pool import IndexedPool, SelectablePool
from lightning_chips.data.preprocess import resolve_tokenizer
from lightning_chips.engine import (
    NO_ID,
    Collective,
    RoundScores,
    check_max_skipped,
    name_skipped,
    round_learning_rate,
    run_round,
    skipped_arrays,
)
from lightning_chips.gallery import log_round_images
from lightning_chips.groups import (
    check_group_by,
    check_group_labels,
    dataset_group_labels,
    group_metrics,
    shares_text,
    starved_text,
)
from lightning_chips.metrics import PromptEncoder
from lightning_chips.rescore import CandidateRescore, CandidateState, check_rescore, kept_ranking, plan_round
from lightning_chips.scoring import RoundContext, Scorer, build_scorer
from lightning_chips.selection import MODES, Mode, Selection, budget_for, select, write_round_file

__all__ = ["NO_ID", "DataSelectionCallback"]


class DataSelectionCallback(Callback):
    """Select the pool pairs a CLIP trains on, and re-select them as the model moves.

    One selection round: resolve the CLIP (:func:`~lightning_chips.adapters.resolve_adapter`); extract the
    target's and a pool sample's pre-projection features and ``scorer.prepare`` on them; stream the whole pool
    through the towers and ``scorer.score`` (each rank scores its shard; scores are all-gathered); build the
    :class:`~lightning_chips.selection.Selection` of ``round(fraction * N)`` pairs, identical on every rank
    (ties broken by id); hand it to the :class:`~lightning_chips.data.ScoredSubsetDataModule`, whose sampler
    draws the next epoch's batches from it; write ``save_dir/round_{r:04d}.npz`` atomically; log the selected
    fraction, the overlap with the previous round and score quantiles, and print a one-line summary.

    **Reports.** With ``group_by`` (metadata fields of the pool's items, or of a WebDataset sample's json), the
    round file keeps each pair's group (:mod:`lightning_chips.groups`) and the loggers get each group's share of
    the pool and of the selection and the share of it kept (``selection/group/FIELD=VALUE/{pool,selected,kept}``,
    the :data:`MAX_LOGGED_GROUPS` largest groups per field); the summary line names a starved group. Every round
    logs a score histogram (TensorBoard natively; a PNG beside the round file otherwise). With ``gallery=k`` the
    round also reads back its top-k and bottom-k pairs and the k that entered and left the selection, writes them
    to ``round_{r:04d}_gallery.npz``, and logs each gallery as an image grid to the loggers that take images
    (TensorBoard, W&B, MLflow; PNG files beside the round file for the others). ``lightning-chips report
    RUN_DIR`` turns the round files into one HTML page.

    Pool pairs that fail to load or to pass the checks (:class:`~lightning_chips.data.checks.CheckedPairs`), and
    pairs whose id an earlier pair of the pool already has (the first is kept), are skipped: never selected,
    counted in the summary line and in :attr:`history` (``"skipped"``,
    ``"target_skipped"``), listed in :attr:`skipped`, and named in the round file (``bad_indices``, ``bad_ids``
    with :data:`NO_ID` for a pair without an id, ``bad_reasons``). A streaming pool
    (:class:`~lightning_chips.data.WebDatasetDataModule`) has no indices: its skipped samples are
    :class:`~lightning_chips.data.checks.SkippedSample` s with shard and key, named in the round file by
    ``bad_ids`` (the uid, or :data:`NO_ID` when the json gives none), ``bad_keys``, ``bad_shards`` and
    ``bad_reasons``, and a shard
    that could not be read to the end is listed in :attr:`shard_errors`, in the round file
    (``unreadable_shards``, ``shard_errors``) and in :attr:`history` (``"unreadable_shards"``). Under DDP every
    rank agrees that its part of a round succeeded before each all-gather, so an exception on one rank ends the
    fit on every rank instead of leaving the others waiting. Over ``max_skipped`` of the pool's pairs skipped
    (duplicate ids do not count), the round fails on every rank (:class:`~lightning_chips.engine.TooManySkippedError`,
    with the first loading error's traceback). Rank 0's logging after a round's round file (metrics, histogram,
    galleries, summary line) and the report at the end of the fit are extras: an exception there is a warning on
    every rank (:meth:`~lightning_chips.engine.Collective.optional`), and the fit goes on.

    Round 0 is scored with the starting model before the first training step (the CHIPS paper's one-shot
    selection) unless ``warmup_steps > 0``, in which case the whole pool is sampled until the first epoch end at
    or after ``warmup_steps``. Later rounds happen at epoch ends (one epoch = ``steps_per_round`` steps of the
    data module) when :meth:`should_select` says so: every ``every_n_epochs`` epochs, or at the first epoch end
    at least ``every_n_steps`` steps after the previous round. With neither, selection is one-shot.

    Args:
        scorer: a :class:`~lightning_chips.scoring.Scorer` or a registered name (``"chips"``, ``"random"``).
        fraction: share of the pool to keep, in (0, 1].
        every_n_steps: re-select at the first epoch end at least this many steps after the previous round.
        every_n_epochs: re-select every this many epochs (rounds).
        warmup_steps: train on the whole pool for this many steps before the first selection.
        target: target-domain pairs (default: the data module's ``target``).
        pool_sample: pool pairs given to ``scorer.prepare`` (bank, curvature); ``None`` = the whole pool, whose
            features are then extracted once and reused for scoring.
        mode: ``"topk"``, ``"weighted"`` or ``"stratified"`` (see :func:`~lightning_chips.selection.select`).
        temperature: sampling temperature of ``mode="weighted"``.
        seed: seed of the pool sample (with the round).
        save_dir: where round files go (default: ``<trainer.log_dir>/selection``, inside the logger's versioned
            folder); ``""`` disables them. A fresh fit refuses a folder that holds round files of an earlier run.
        overwrite: let a fresh fit overwrite the round files of an earlier run in ``save_dir``.
        log: log selection metrics to the trainer's loggers.
        progress: show progress bars for the scoring passes (rank 0; never when the trainer has
            ``enable_progress_bar=False``).
        adapter: an explicit :class:`~lightning_chips.adapters.CLIPAdapter` for a model
            :func:`~lightning_chips.adapters.resolve_adapter` does not know.
        group_by: metadata fields to report the selection by (e.g. ``["source", "label"]``).
        group_labels: names of the values of ``group_by`` fields, e.g. ``{"domain": ["general", "target"]}`` (a
            list names the values 0, 1, ...) or ``{"source": {"w": "web"}}``; they replace the values in round
            files, metrics, the round line and the report. By default the names the pool dataset declares in its
            ``group_labels`` attribute (the built-in and real datasets name ``domain``); these win over them.
        gallery: pairs per gallery (top, bottom, entered, left) read back and logged each round; 0 (default)
            reads nothing and costs nothing.
        thumbnail_size: side in pixels of the gallery thumbnails.
        report: at the end of the fit, write ``report.html`` beside the round files (``lightning-chips report``'s
            page) and print where it is; otherwise print the command that writes it.
        max_skipped: the largest share of the pool's pairs, in [0, 1], a round may skip because they failed to
            load or the checks (default 0.05); above it the round fails (1 = no limit, 0 = none may fail).
        rescore: which pairs a round after the first encodes: None / ``"all"`` (default: every pool pair), or
            :class:`~lightning_chips.rescore.CandidateRescore` ``(widen, explore, anchor, min_anchor)`` (YAML:
            ``{widen: 1.2, explore: 0.025, anchor: 0.025, min_anchor: 512}``): the last round's top ``widen x
            budget``, a fixed uniform ``anchor`` share of the pool, at least ``min_anchor`` pairs (the scorer's
            prepare sample), a uniform ``explore`` share drawn each round and the pairs it could not use; the others
            sit out the round (:mod:`lightning_chips.rescore`, docs/selection.md "Candidate rounds"). Needs a
            map-style pool.

    Raises:
        ValueError: on a fraction outside (0, 1], both or negative schedules, an unknown scorer or mode, a
            ``max_skipped`` outside [0, 1], or an empty target when the scorer needs one.

    Example::

        >>> from lightning_chips import DataSelectionCallback
        >>> from lightning_chips.scoring import CHIPS
        >>> callback = DataSelectionCallback(CHIPS(sketch_dim=512), fraction=0.3, every_n_epochs=1)
        >>> # trainer = Trainer(callbacks=[callback]); trainer.fit(model, datamodule=ScoredSubsetDataModule(...))
    """

    def __init__(
        self,
        scorer: Scorer | str = "chips",
        fraction: float = 0.3,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        warmup_steps: int = 0,
        target: Dataset | None = None,
        pool_sample: int | None = None,
        mode: Mode = "topk",
        temperature: float = 1.0,
        seed: int = 0,
        save_dir: str | None = None,
        log: bool = True,
        progress: bool = True,
        adapter: CLIPAdapter | None = None,
        overwrite: bool = False,
        group_by: Sequence[str] | None = None,
        group_labels: dict[str, dict[str, str] | list[str]] | None = None,
        gallery: int = 0,
        thumbnail_size: int = 64,
        report: bool = False,
        max_skipped: float = 0.05,
        rescore: CandidateRescore | dict[str, float] | str | None = None,
    ) -> None:
        super().__init__()
        group_fields = check_group_by(group_by)
        labels = check_group_labels(group_labels, group_fields)
        check_max_skipped(max_skipped)
        self.rescore = check_rescore(rescore)
        if gallery < 0:
            raise ValueError(f"`gallery` must be >= 0 (pairs per gallery; 0 = none), got {gallery}.")
        if not 16 <= thumbnail_size <= 512:
            raise ValueError(f"`thumbnail_size` must be in [16, 512] pixels, got {thumbnail_size}.")
        if isinstance(scorer, str):
            scorer = build_scorer(scorer)
        if not isinstance(scorer, Scorer):
            raise ValueError(f"`scorer` must be a lightning_chips Scorer or a registered name, got {type(scorer)}.")
        budget_for(1, fraction)  # validates fraction in (0, 1]
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("Pass at most one of `every_n_steps` and `every_n_epochs` (neither = one-shot selection).")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {value}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        if pool_sample is not None and pool_sample < 2:
            raise ValueError(f"`pool_sample` must be >= 2 or None (the whole pool), got {pool_sample}.")
        if mode not in MODES:
            raise ValueError(f"Unknown `mode` {mode!r}; use one of {MODES}.")
        if mode == "stratified" and self.rescore is not None:
            raise ValueError(
                "mode='stratified' sets label quotas from the whole pool, which a candidate round (`rescore`) does "
                "not score: use mode='topk' or 'weighted' with `rescore`, or leave `rescore` unset."
            )
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if target is not None and len(target) == 0 and scorer.requires_target:
            raise ValueError(
                f"`target` is empty but the {type(scorer).__name__} scorer needs target pairs; pass a non-empty "
                "target dataset (or None to use the data module's)."
            )
        self.scorer = scorer
        self.fraction = fraction
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.warmup_steps = warmup_steps
        self.target = target
        self.pool_sample = pool_sample
        self.mode: Mode = mode
        self.temperature = temperature
        self.seed = seed
        self.save_dir = save_dir
        self.log = log
        self.progress = progress
        self.adapter = adapter
        self.overwrite = overwrite
        self.group_by = group_fields
        self.group_labels = labels
        self.gallery = gallery
        self.thumbnail_size = thumbnail_size
        self.report = report
        self.max_skipped = float(max_skipped)

        self.round = 0  # the index the next selection round gets
        self.context = RoundContext(seed=seed)  # the context of the last (or running) round
        self.selection: Selection | None = None
        self.last_step = 0
        self.last_epoch = 0  # completed epochs at the last selection
        self.history: list[dict[str, float]] = []
        self.skipped: list[SkippedSample] = []  # the last round's pool pairs that could not be used
        self.shard_errors: dict[str, str] = {}  # streaming pools: the last round's unreadable shards -> error
        self.candidates: CandidateState | None = None  # what the next candidate round needs (with `rescore`)
        self._restored = False
        self._fit_started: float | None = None

    @property
    def state_key(self) -> str:
        return f"DataSelectionCallback[scorer={type(self.scorer).__name__}, fraction={self.fraction}]"

    # -- schedule ------------------------------------------------------------------------------------------------
    def should_select(self, step: int, epoch: int) -> bool:
        """Whether to run a selection round at the end of epoch ``epoch`` (0-based) at global step ``step``.

        Override it for custom schedules (like Lightning's ``WeightAveraging.should_update``).
        """
        if self.selection is None:
            return step >= self.warmup_steps
        if self.every_n_epochs is not None:
            return epoch + 1 - self.last_epoch >= self.every_n_epochs
        if self.every_n_steps is not None:
            return step - self.last_step >= self.every_n_steps
        return False

    # -- hooks ---------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, SelectablePool):
            raise ValueError(
                "DataSelectionCallback needs a data module it can select from: a lightning_chips.data."
                "ScoredSubsetDataModule or WebDatasetDataModule (or one of your own implementing lightning_chips.data."
                "pool.SelectablePool), passed as `trainer.fit(model, datamodule=...)`; got "
                f"{type(datamodule).__name__ if datamodule is not None else 'none'}."
            )
        if self.rescore is not None and not isinstance(datamodule, IndexedPool):
            raise ValueError(
                f"`rescore={self.rescore}` re-scores a part of the pool, read by dataset index, which "
                f"{type(datamodule).__name__} cannot do (a shard pool reads whole shards): use a "
                "ScoredSubsetDataModule, or leave `rescore` unset to score every pair each round."
            )
        resolve_adapter(pl_module, self.adapter)  # fail before training if the CLIP cannot be reached
        target = self.target if self.target is not None else getattr(datamodule, "target", None)
        if self.scorer.requires_target and (target is None or len(target) == 0):
            raise ValueError(
                f"The {type(self.scorer).__name__} scorer needs target pairs: pass `target` to the callback or to "
                "ScoredSubsetDataModule."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._check_round_dir(trainer)  # here, not in setup: a resumed fit's state is restored by now
        if self._restored and self.selection is not None:
            trainer.datamodule.selection = self.selection
            if self.history:  # a monitor of a selection metric finds the last round's value after a resume
                self._publish(trainer, self.history[-1])
        elif self.selection is None and self.warmup_steps == 0:
            self.run_round(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _is_last_epoch(trainer):
            return
        if self.should_select(trainer.global_step, trainer.current_epoch):
            self.run_round(trainer, pl_module, at_epoch_end=True)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = self.round_dir(trainer)
        if directory is None:
            return

        def report() -> None:  # rank 0; the fit succeeded, so a report that cannot be written must not fail it
            if not any(directory.glob("round_*.npz")):
                return
            if not self.report:
                rank_zero_info(f"[lightning-chips] the round files are in {directory}; see them on one page with: "
                               f"lightning-chips report {directory}")  # fmt: skip
                return
            from lightning_chips.report import build_report

            page = build_report(directory)
            rank_zero_info(f"[lightning-chips] open the selection report in a browser: {page.resolve().as_uri()}")

        Collective(trainer).optional(f"writing the selection report of {directory}", report)

    # -- one round -----------------------------------------------------------------------------------------------
    def run_round(self, trainer: Trainer, pl_module: LightningModule, *, at_epoch_end: bool = False) -> Selection:
        """Score the pool with the current model and install the new selection (all ranks).

        The scoring is :func:`lightning_chips.engine.run_round` (the same steps as ``lightning-chips score``); this
        method adds the round's context, the selection, the round file, the logged metrics and the summary line.
        Pool pairs that could not be used (failed to load or the checks, a duplicate id after its first pair) are
        skipped: never selected, counted in the summary line and :attr:`history` (``"skipped"``), and named in the
        round file. Under DDP the ranks agree that each local step succeeded before every gather: an exception on
        one rank is raised there, and the others raise a ``RuntimeError`` naming that rank and its error.
        """
        start = time.perf_counter()
        datamodule = trainer.datamodule
        adapter = resolve_adapter(pl_module, self.adapter)
        r = self.round
        collate_tokenizer = getattr(getattr(datamodule, "collate", None), "tokenizer", None)
        # prompts need a tokenizer only when a scorer embeds them: without one, that call says what to pass
        tokenizer = collate_tokenizer or resolve_tokenizer(None, None, pl_module, required=False)
        lr = round_learning_rate(pl_module, trainer.optimizers)
        self.context = RoundContext(round=r, learning_rate=lr, text_encoder=PromptEncoder(adapter, tokenizer),
                                    seed=self.seed)  # fmt: skip
        collective = Collective(trainer)
        pool_size = datamodule.pool_size()
        plan, budget = plan_round(self.rescore, self.candidates, pool_size=pool_size, fraction=self.fraction, round=r,
                                  seed=self.seed, pool_sample=self.pool_sample)  # fmt: skip
        result = run_round(
            self.scorer, adapter, datamodule, self.context, target=self.target, pool_sample=self.pool_sample,
            collective=collective, device=pl_module.device,
            progress=self.progress and trainer.progress_bar_callback is not None,
            precision=trainer.precision_plugin.forward_context, group_by=self.group_by,
            group_labels=self._group_labels(datamodule), max_skipped=self.max_skipped, candidates=plan,
        )  # fmt: skip
        skipped, shard_errors = result.skipped, result.shard_errors
        n = len(result.ids)
        if self.rescore is not None and result.positional:
            self.candidates = CandidateState.after_round(
                self.candidates, indices=result.indices, ids=result.ids, scores=result.scores,
                skipped_indices=np.array([s.index for s in skipped if s.index is not None], dtype=np.int64),
                keep=kept_ranking(self.rescore, pool_size, self.fraction), pool_size=pool_size, round=r,
                full=plan is None,
            )  # fmt: skip
            n = self.candidates.pool_pairs(pool_size) if plan is not None else n  # the budget is of the pool
        budget_kwargs = {"fraction": self.fraction} if plan is None else {"count": min(budget, len(result.ids))}
        selection = select(
            result.ids, result.scores, mode=self.mode, labels=result.labels, indices=result.indices,
            temperature=self.temperature, round=r, method=type(self.scorer).__name__, **budget_kwargs,
        )  # fmt: skip
        previous = self.selection
        self.selection = selection
        self.skipped, self.shard_errors = list(skipped), shard_errors
        datamodule.selection = selection
        self.last_step, self.last_epoch = trainer.global_step, trainer.current_epoch + int(at_epoch_end)
        self.round = r + 1
        metrics = self._metrics(selection, previous, result.scores, n)
        selected = selection.contains(result.ids)
        metrics.update(group_metrics(result.groups, selected))
        metrics["skipped"] = float(len(skipped))
        metrics["encoded"] = float(result.encoded)
        metrics["target_skipped"] = float(len(result.target_skipped))
        metrics.update({name: float(value) for name, value in self.scorer.round_metrics().items()})
        if not result.positional:
            metrics["unreadable_shards"] = float(len(shard_errors))
        self.history.append(metrics)
        self._publish(trainer, metrics)

        def write() -> None:  # rank 0 writes; the others learn whether it could
            if trainer.is_global_zero:
                arrays = skipped_arrays(skipped, shard_errors, result.positional)
                seconds = time.perf_counter() - start
                fit = max(time.perf_counter() - (self._fit_started or start), seconds)
                arrays.update(encoded=np.int64(result.encoded), pool_pairs=np.int64(n), round_seconds=seconds,
                              fit_share=seconds / fit if fit > 0 else 1.0)  # fmt: skip
                self._write(trainer, selection, result, arrays)

        collective.agree(r, "the round file", write)

        def log_round() -> None:  # rank 0's extras, after the round's agreement
            if self.log:
                for logger in trainer.loggers:
                    logger.log_metrics({f"selection/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            directory = self.round_dir(trainer)
            log_round_images(
                trainer.loggers if self.log else [], r, directory and directory / f"round_{r:04d}.npz", datamodule,
                result, selected, None if previous is None else previous.contains(result.ids), step=trainer.global_step,
                gallery=self.gallery, thumbnail_size=self.thumbnail_size,
            )  # fmt: skip

        def summarize() -> None:
            for what, found in (("pool", skipped), ("target", result.target_skipped)):
                if found:
                    rank_zero_warn(
                        f"[lightning-chips] round {r}: skipped {len(found)} {what} pairs that could not be used "
                        f"(never selected; the round file lists them all): {name_skipped(found)}"
                    )
            if shard_errors:
                named = "; ".join(f"{url}: {error}" for url, error in list(shard_errors.items())[:5])
                rank_zero_warn(
                    f"[lightning-chips] round {r}: {len(shard_errors)} pool shards could not be read to the end (the "
                    f"pairs before the damage were scored; the round file lists them): {named}"
                )
            seconds = time.perf_counter() - start
            fit_so_far = time.perf_counter() - (self._fit_started or start)
            kept_before = "" if previous is None else f"; {metrics['overlap']:.1%} of them were kept last round too"
            total = f" of {pool_size:,}" if pool_size is not None else ""
            kept_before += f"; encoded {result.encoded:,}{total} pool pairs" + (
                "" if plan is None else f" ({plan.describe(pool_size, r - 1)})"
            )  # type: ignore[arg-type]
            skipped_text = (f"; {len(skipped)} pairs skipped (unreadable, failed checks or duplicate ids; the round "
                            "file lists them)" if skipped else "")  # fmt: skip
            if shard_errors:
                skipped_text += f"; {len(shard_errors)} shards could not be read to the end"
            skipped_text += shares_text(result.groups, selected) + starved_text(
                result.groups, selected, metrics["fraction"]
            )
            rank_zero_info(
                f"[lightning-chips] round {r} at step {trainer.global_step}: kept {len(selection):,} of {n:,} pool "
                f"pairs ({metrics['fraction']:.1%}) by {selection.method}{kept_before}{skipped_text}; the round took "
                f"{seconds:.1f}s ({seconds / max(fit_so_far, seconds):.0%} of the fit so far); score q10/q50/q90 = "
                f"{metrics['score_q10']:.4g}/{metrics['score_q50']:.4g}/{metrics['score_q90']:.4g}; "
                f"{self.scorer.summary()}"
            )

        def extras() -> None:
            try:
                log_round()
            finally:  # the summary line even when the logging failed
                summarize()

        collective.optional(f"round {r}'s logging (metrics, score histogram, gallery, summary line)", extras)
        return selection

    @staticmethod
    def _publish(trainer: Trainer, metrics: dict[str, float]) -> None:
        """The round's metrics as ``trainer.callback_metrics["selection/..."]`` on every rank (they agree), where
        ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` look; the loggers get them separately (rank 0)."""
        for key, value in metrics.items():
            trainer.callback_metrics[f"selection/{key}"] = torch.tensor(float(value))

    def _metrics(self, selection: Selection, previous: Selection | None, scores: np.ndarray, n: int) -> dict:
        q10, q50, q90 = np.quantile(scores, [0.1, 0.5, 0.9])
        return {
            "round": float(selection.round),
            "fraction": len(selection) / n,
            "overlap": selection.overlap(previous),
            "score_q10": float(q10),
            "score_q50": float(q50),
            "score_q90": float(q90),
        }

    def round_dir(self, trainer: Trainer) -> Path | None:
        """Where round files go: ``save_dir``, or ``<trainer.log_dir>/selection`` (a logger's versioned folder, so
        re-runs do not collide); None when ``save_dir=""``."""
        if self.save_dir == "":
            return None
        return Path(self.save_dir) if self.save_dir is not None else Path(trainer.log_dir or ".") / "selection"

    def _check_round_dir(self, trainer: Trainer) -> None:
        """A fresh fit must not overwrite the round files of an earlier one (a resumed fit continues its own)."""
        directory = self.round_dir(trainer)
        found = sorted(p.name for p in directory.glob("round_*.npz")) if directory and directory.is_dir() else []
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)  # rank 0 writes: its view decides
        if found and not self.overwrite and not self._restored:
            raise ValueError(
                f"{directory} already holds round files of an earlier run ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}). Pass another `save_dir` (or leave it unset: round files then "
                "go to the logger's versioned folder), resume that run with `ckpt_path`, or pass `overwrite=True`."
            )

    def _write(self, trainer: Trainer, selection: Selection, result: RoundScores,
               bad_arrays: dict[str, np.ndarray]) -> None:  # fmt: skip
        directory = self.round_dir(trainer)
        if directory is None:
            return
        ids = result.ids if result.uids is None else result.uids
        write_round_file(
            directory / f"round_{selection.round:04d}.npz", ids, result.scores, selection.contains(result.ids),
            groups=result.groups, round=selection.round, method=selection.method, fraction=self.fraction,
            settings=json.dumps(self._settings(trainer, len(result.ids))), **bad_arrays,
        )  # fmt: skip

    def _group_labels(self, datamodule: Any) -> dict[str, dict[str, str]]:
        """The pool dataset's value names of the ``group_by`` fields, updated with the constructor's."""
        declared = dataset_group_labels(getattr(datamodule, "pool", None))
        labels = {field: declared[field] for field in self.group_by if field in declared}
        for field, names in self.group_labels.items():
            labels[field] = {**labels.get(field, {}), **names}
        return labels

    def _settings(self, trainer: Trainer, n: int) -> dict[str, Any]:
        """What a report shows as the run's settings."""
        return {
            "scorer": type(self.scorer).__name__, "scorer_summary": self.scorer.summary(), "fraction": self.fraction,
            "mode": self.mode, "every_n_steps": self.every_n_steps, "every_n_epochs": self.every_n_epochs,
            "warmup_steps": self.warmup_steps, "pool_sample": self.pool_sample, "seed": self.seed,
            "group_by": list(self.group_by), "gallery": self.gallery, "max_skipped": self.max_skipped,
            "rescore": "all" if self.rescore is None else vars(self.rescore),
            "pool_pairs_scored": n, **{f"scorer.{k}": v for k, v in self.scorer.config()["arguments"].items()},
            **{f"estimate.{k}": v for k, v in self.scorer.round_metrics().items()},
            "global_step": trainer.global_step, "epoch": trainer.current_epoch, "world_size": trainer.world_size,
        }  # fmt: skip

    # -- state -------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        selection = None
        if self.selection is not None:
            sel = self.selection
            selection = {
                "ids": torch.as_tensor(sel.ids),
                "indices": torch.as_tensor(sel.indices),
                "weights": None if sel.weights is None else torch.as_tensor(sel.weights),
                "round": sel.round,
                "method": sel.method,
                "num_candidates": sel.num_candidates,
            }
        return {
            "round": self.round,
            "seed": self.seed,
            "selection": selection,
            "last_step": self.last_step,
            "last_epoch": self.last_epoch,
            "history": list(self.history),
            "scorer": self.scorer.state_dict(),
            "candidates": None if self.candidates is None else self.candidates.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict["round"])
        saved_seed = int(state_dict["seed"])
        if saved_seed != self.seed:  # the constructor's seed is the configuration; the checkpoint's is history
            rank_zero_warn(
                f"DataSelectionCallback: the checkpoint's selection seed is {saved_seed}, this callback's is "
                f"{self.seed}; the resumed rounds use {self.seed}, so they differ from the interrupted run's. Pass "
                f"seed={saved_seed} to resume it exactly."
            )
        self.last_step = int(state_dict["last_step"])
        self.last_epoch = int(state_dict["last_epoch"])
        self.history = list(state_dict.get("history", []))
        self.scorer.load_state_dict(state_dict.get("scorer", {}))
        candidates = state_dict.get("candidates")
        self.candidates = None if candidates is None else CandidateState.from_state_dict(candidates)
        sel = state_dict.get("selection")
        if sel is not None:
            self.selection = Selection.from_state_dict(
                {k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in sel.items()}
            )
        self._restored = True


def _is_last_epoch(trainer: Trainer) -> bool:
    """True when training stops after this epoch (a selection now would never be trained on)."""
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
