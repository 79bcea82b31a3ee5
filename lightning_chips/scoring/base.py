"""The Scorer contract: ``prepare`` once per selection round, then stream ``score`` over the pool; every scorer's
settings in one frozen, validated ``arguments`` dataclass, from which its ``repr`` and :meth:`Scorer.config` come."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import operator
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures

__all__ = ["IdLookup", "RoundContext", "Scorer", "check_prepare_inputs"]


@dataclass(frozen=True)
class RoundContext:
    """What a selection round tells its scorer, passed to :meth:`Scorer.prepare` (never set as attributes).

    Attributes:
        round: the selection round being scored (0 for a one-shot ``lightning-chips score``).
        learning_rate: the optimizer's learning rate at this round (TracIn weights rounds by it).
        text_encoder: normalised text embeddings ``[P, e]`` of prompts under the current model (class prompts for
            zero-shot pseudo-labels, CLIP-powered selection); the callback and ``lightning-chips score`` give one.
        seed: the selection's seed (the pool sample's draw; scorers keep their own ``seed`` argument).

    Example::

        >>> scorer.prepare(endpoint, target, pool_sample, RoundContext(round=3, learning_rate=1e-4))  # doctest: +SKIP
    """

    round: int = 0
    learning_rate: float = 1.0
    text_encoder: Callable[[list[str]], Tensor] | None = None
    seed: int = 0


class Scorer(ABC):
    """A data-selection score: higher means "train on this pair".

    Lifecycle per selection round: :meth:`prepare` with the current end point, the target pairs' features and a
    sample of the pool's features computes the round's statistics (target gradient, curvature solve, bank, ...);
    :meth:`score` is then called on consecutive pool batches and must be pure given the prepared state (a
    pair's score does not depend on its batch), with memory independent of the pool size.

    Class attributes:
        name: the registry name (``build_scorer(name)``).
        requires_target: whether :meth:`prepare` needs target pairs.

    A round's context (its index, learning rate, prompt encoder, seed) arrives as the :class:`RoundContext`
    argument of :meth:`prepare`; :attr:`round`, :attr:`learning_rate` and :attr:`text_encoder` read it.

    **Settings.** A scorer's settings are one frozen dataclass instance, :attr:`arguments`, that its constructor
    builds from its keyword arguments and that validates them once (``CHIPS`` holds a
    :class:`~lightning_chips.functional.chips.ChipsArguments`, ``NormSim`` a ``NormSimArguments``, ...). Its fields
    read as attributes (``scorer.alpha``) and cannot be assigned (build a new scorer); ``repr(scorer)`` prints every
    field in field order (``CHIPS(alpha=0.7, beta=0.5, ..., seed=0, ...)``) and :meth:`config` returns them as
    JSON. ``lightning-chips score`` names its run by the repr, so two runs with different settings are told apart.
    A scorer written without ``arguments`` still works, but its repr is only its class name (``MyScorer()``): give
    it one so that runs with different settings are not mistaken for each other::

        @dataclass(frozen=True)
        class MyArguments:
            temperature: float = 0.1

        class MyScorer(Scorer):
            def __init__(self, *, temperature: float = 0.1) -> None:
                self.arguments = MyArguments(temperature=temperature)
    """

    name: ClassVar[str] = ""
    requires_target: bool = True
    """Whether :meth:`prepare` needs target pairs (a class attribute; composites set it from their parts)."""
    context: RoundContext = RoundContext()
    """The :class:`RoundContext` of the last :meth:`prepare` (recorded by :meth:`use_context`)."""
    arguments: Any = None
    """The settings: a frozen dataclass instance (``None``: a scorer without settings, or one written without them;
    see the class docstring)."""
    reads_endpoint: ClassVar[bool] = True
    """Whether :meth:`prepare` reads the end point (checked finite before :meth:`prepare_round`)."""
    reads_pool_sample: ClassVar[bool] = True
    """Whether :meth:`prepare` computes from the pool sample (checked non-empty and finite before
    :meth:`prepare_round`)."""

    def __getattr__(self, name: str) -> Any:
        """The settings read as attributes (``scorer.alpha``, ``scorer.seed``, ...)."""
        arguments = self.__dict__.get("arguments", type(self).arguments)
        if name in _field_names(arguments):
            return getattr(arguments, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "arguments" and name in _field_names(self.__dict__.get("arguments", type(self).arguments)):
            raise AttributeError(
                f"`{name}` is a setting of {type(self).__name__}, frozen in its `arguments`: build a new scorer "
                f"with `{name}=...` instead of assigning it."
            )
        super().__setattr__(name, value)

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description of the scorer: its registry ``name``, its ``class`` (``module.qualname``)
        and every field of its :attr:`arguments` (scorers among them, the parts of a composite, as their own
        ``config()``; tuples as lists; non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``; torch
        dtypes as their names; anything else JSON cannot hold as its ``repr``).

        Example::

            >>> NormSim(p=2.0).config()  # doctest: +SKIP
            {'name': 'normsim', 'class': 'lightning_chips.scoring.quality.NormSim', 'arguments': {'p': 2.0}}
        """
        cls = type(self)
        return {
            "name": cls.name,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "arguments": {key: _jsonable(value) for key, value in self._argument_items()},
        }

    @classmethod
    def from_arguments(cls, arguments: Any) -> Scorer:
        """The scorer of a settings dataclass: ``CHIPS.from_arguments(ChipsArguments(alpha=0.6))`` is
        ``CHIPS(alpha=0.6, ...)`` with every other keyword read from the same instance, so a configuration typed once
        builds the scorer. A field the constructor does not take must hold the value the constructor sets (``CHIPS``
        keeps ``exact_when_small=True``).

        Raises:
            TypeError: ``arguments`` is not this scorer's settings dataclass.
            ValueError: a field the constructor does not take differs from the value it sets.
        """
        names, given = list(inspect.signature(cls).parameters), type(arguments).__name__
        if not _is_dataclass_instance(arguments) or not all(hasattr(arguments, name) for name in names):
            raise TypeError(f"{cls.__name__}.from_arguments takes its settings dataclass, got {given}.")
        scorer = cls(**{name: getattr(arguments, name) for name in names})
        if type(scorer.arguments) is not type(arguments):
            raise TypeError(f"{cls.__name__}.from_arguments takes a {type(scorer.arguments).__name__}, got {given}.")
        differ = [
            f"{key}={getattr(arguments, key)!r} (it sets {value!r})"
            for key, value in scorer._argument_items()
            if value != getattr(arguments, key)
        ]
        if differ:
            raise ValueError(f"{cls.__name__} cannot take {', '.join(differ)}.")
        return scorer

    def __repr__(self) -> str:
        """``Name(field=value, ...)`` over every field of :attr:`arguments`, in field order (``Name()`` without)."""
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in self._argument_items())})"

    def _argument_items(self) -> list[tuple[str, Any]]:
        arguments = self.arguments
        if arguments is None:
            return []
        if not _is_dataclass_instance(arguments):
            raise TypeError(
                f"{type(self).__name__}.arguments must be a dataclass instance holding the settings (or None), got "
                f"{type(arguments).__name__}."
            )
        return [(field.name, getattr(arguments, field.name)) for field in dataclasses.fields(arguments)]

    @property
    def round(self) -> int:
        """The round being scored (from the context)."""
        return self.context.round

    @property
    def learning_rate(self) -> float:
        """The round's learning rate (from the context)."""
        return self.context.learning_rate

    @property
    def text_encoder(self) -> Callable[[list[str]], Tensor] | None:
        """The round's prompt encoder (from the context)."""
        return self.context.text_encoder

    def __init_subclass__(cls, **kwargs) -> None:
        """Deprecated: a scorer written before :class:`RoundContext` (``prepare(endpoint, target, pool_sample)``)
        still works, with a ``DeprecationWarning`` when its class is defined: its ``prepare`` is wrapped to take the
        context and record it, so :attr:`round` and friends read it. Write :meth:`prepare_round` instead."""
        super().__init_subclass__(**kwargs)
        prepare = cls.__dict__.get("prepare")
        if prepare is None or len(inspect.signature(prepare).parameters) != 4:  # self, endpoint, target, pool_sample
            return
        warnings.warn(
            f"{cls.__qualname__}.prepare(endpoint, target, pool_sample) without the `context` argument is deprecated: "
            "write `prepare_round(self, endpoint, target, pool_sample)` (Scorer.prepare records the context and "
            "checks the inputs first) or `prepare(self, endpoint, target, pool_sample, context=None)`.",
            DeprecationWarning,
            stacklevel=3,  # the class statement (through ABCMeta.__new__)
        )

        @functools.wraps(prepare)
        def prepare_with_context(self, endpoint, target, pool_sample, context=None):  # noqa: ANN001
            self.use_context(context)
            return prepare(self, endpoint, target, pool_sample)

        cls.prepare = prepare_with_context

    def use_context(self, context: RoundContext | None) -> RoundContext:
        """Record the round's context (``None``: the defaults); implementations call it first in :meth:`prepare`."""
        if context is not None and not isinstance(context, RoundContext):
            raise TypeError(f"`context` must be a RoundContext, got {type(context).__name__}.")
        self.context = context if context is not None else RoundContext()
        return self.context

    def end_round(self, ids: Tensor, scores: Tensor) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called on every rank once a round's scores are gathered, with the ``[N]`` int64 ids (keys of string ids)
        and ``[N]`` float32 scores of every scored pool pair of every rank, each id once, in pool order. A scorer that
        keeps history across rounds (TracIn's running totals) records it here, so every rank holds the whole
        history and :meth:`state_dict` (saved from rank 0) has it."""

    @property
    def keeps_history(self) -> bool:
        """Whether :meth:`end_round` records something (by default: whether the class overrides it). Composites
        forward the hook, with their parts' own scores, to the parts that keep history."""
        return type(self).end_round is not Scorer.end_round

    def state_dict(self) -> dict:
        """State that must survive a checkpoint (most scorers have none: they are prepared anew each round)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Restore :meth:`state_dict`."""

    def prepare(
        self,
        endpoint: EndPoint,
        target: PairFeatures | None,
        pool_sample: PairFeatures,
        context: RoundContext | None = None,
    ) -> None:
        """Compute the round's statistics; ``context`` says which round.

        The preamble every scorer shares, written once: record the context (:meth:`use_context`), validate the
        inputs (:func:`check_prepare_inputs`: the target when :attr:`requires_target`, the end point when
        :attr:`reads_endpoint`, the pool sample when :attr:`reads_pool_sample`), then :meth:`prepare_round`, the
        scorer's own part. A scorer overriding ``prepare`` itself calls :meth:`use_context` first.
        """
        self.use_context(context)
        check_prepare_inputs(
            self,
            endpoint if self.reads_endpoint else None,
            target,
            pool_sample,
            uses_target=self.requires_target,
            uses_pool_sample=self.reads_pool_sample,
        )
        self.prepare_round(endpoint, target, pool_sample)

    def prepare_round(  # noqa: B027 - optional hook, a no-op by default
        self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures
    ) -> None:
        """The scorer's own part of :meth:`prepare`, called with the context recorded (:attr:`context`) and the
        inputs validated. Nothing by default (a scorer that needs no statistics, such as ``Random``)."""

    @abstractmethod
    def score(self, batch: PairFeatures) -> Tensor:
        """``[B]`` float scores of a batch of pool pairs."""

    def summary(self) -> str:
        """One line describing the prepared state (logged once per round)."""
        return type(self).__name__

    def round_metrics(self) -> dict[str, float]:
        """Quantities the prepared round estimated, by name (e.g. CHIPS's ``noise_share``): logged as
        ``selection/<name>`` each round, kept in the round file's settings and shown by the report. None by default."""
        return {}


def _is_dataclass_instance(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


@functools.cache
def _fields_of(cls: type) -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(cls))


def _field_names(arguments: object) -> frozenset[str]:
    """The field names of an arguments dataclass instance (none for ``None`` or anything else)."""
    return _fields_of(type(arguments)) if _is_dataclass_instance(arguments) else frozenset()


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it (see :meth:`Scorer.config`)."""
    if isinstance(value, Scorer):
        return value.config()
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if _is_dataclass_instance(value):
        return {field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    return repr(value)


# --------------------------------------------------------------------------------------------------------------
# validation of settings, shared by the arguments dataclasses (each message names the argument and what to pass)
# --------------------------------------------------------------------------------------------------------------
def integer_setting(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (>= ``minimum``), or a ``ValueError`` naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an integer, got {value!r}.") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {number}.")
    return number


def real_setting(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None, finite: bool = True) -> float:  # fmt: skip
    """``value`` as a ``float`` in range, or a ``ValueError`` naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    number = float(value)
    bounds = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
              f"<= {at_most}" if at_most is not None else ""]  # fmt: skip
    wanted = " and ".join(b for b in bounds if b)
    if (
        math.isnan(number)
        or (finite and math.isinf(number))
        or (above is not None and not number > above)
        or (at_least is not None and not number >= at_least)
        or (at_most is not None and not number <= at_most)
    ):
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"`{name}` must be {kind}{' ' + wanted if wanted else ''}, got {value!r}.")
    return number


def choice_setting(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, or a ``ValueError`` naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def strings_setting(name: str, value: Any) -> tuple[str, ...]:
    """A sequence of strings (``None``: empty) as a tuple, or a ``ValueError`` naming ``name``."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"`{name}` must be a list of strings such as ['cat', 'dog'], got {value!r}.")
    return tuple(value)


def on_endpoint_device(
    endpoint: EndPoint, target: PairFeatures, pool_sample: PairFeatures
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(target image, target text, pool-sample image, pool-sample text, pool-sample ids)`` on the end point's
    device: the leading inputs of :func:`~lightning_chips.functional.chips.chips_prepare` and
    :func:`~lightning_chips.functional.influence.influence_prepare`."""
    device = endpoint.image_proj.device
    tensors = (target.image, target.text, pool_sample.image, pool_sample.text, pool_sample.ids)
    return tuple(tensor.to(device) for tensor in tensors)


class IdLookup:
    """Per-pair values computed at ``prepare`` time over a pool sample, looked up by id when scoring.

    The pattern of set-level methods (negCLIPLoss partitions, ClipCov's greedy, CLIP-powered selection).
    """

    def __init__(self, ids: Tensor, values: Tensor) -> None:
        order = torch.argsort(ids.cpu())
        self.ids, self.values = ids.cpu()[order], values.cpu()[order]

    def find(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(values, known)`` for ``ids``; ``known`` marks ids that were prepared (their value is valid)."""
        ids = ids.cpu()
        pos = torch.searchsorted(self.ids, ids).clamp(max=len(self.ids) - 1)
        return self.values[pos].clone(), self.ids[pos] == ids

    def require(self, ids: Tensor, method: str) -> Tensor:
        """Values of ``ids``, all of which must have been prepared."""
        values, known = self.find(ids)
        if not bool(known.all()):
            raise ValueError(
                f"{method} is set-level: it can only score pairs it was prepared on; prepare it on the whole pool "
                "(DataSelectionCallback(pool_sample=None))."
            )
        return values


def check_prepare_inputs(
    scorer: Scorer,
    endpoint: EndPoint | None,
    target: PairFeatures | None,
    pool_sample: PairFeatures | None,
    *,
    uses_target: bool,
    uses_pool_sample: bool = True,
) -> None:
    """Validate what :meth:`Scorer.prepare` receives, before any work, with messages that say what to change.

    * ``uses_target``: the target must be given and hold at least one pair.
    * ``uses_pool_sample``: the pool sample must hold at least one pair.
    * The end point and the features the scorer reads (the target when ``uses_target``, the pool sample when
      ``uses_pool_sample``) must be finite: NaN or inf there (a diverged model, corrupt cached features) would
      otherwise spread silently into every score, or surface deep inside as a solver or sampling failure. The
      error names the round and the first offending ids.

    Raises:
        ValueError: a missing or empty target (when ``uses_target``), or an empty pool sample.
        FloatingPointError: NaN or inf in the end point or the features.
    """
    name = type(scorer).__name__
    if uses_target and (target is None or len(target) == 0):
        got = "none" if target is None else "an empty set"
        raise ValueError(
            f"{name} needs target pairs (a small set from the domain you adapt to), got {got}: pass `target` "
            "(DataSelectionCallback(target=...), or `--target` / `target=` of `lightning-chips score`) with at "
            "least one image-caption pair."
        )
    if uses_pool_sample and pool_sample is not None and len(pool_sample) == 0:
        raise ValueError(f"{name}: the pool sample is empty; the pool must hold at least one usable pair.")
    if endpoint is not None:
        fields = [
            field
            for field in ("image_proj", "text_proj", "logit_scale", "image_bias", "text_bias", "logit_bias")
            if getattr(endpoint, field, None) is not None and not bool(torch.isfinite(getattr(endpoint, field)).all())
        ]
        if fields:
            raise FloatingPointError(
                f"{name}: the model's end point holds NaN or inf in {', '.join(fields)} (round {scorer.round}): the "
                "model has diverged. Resume from an earlier checkpoint, or lower the learning rate."
            )
    used = (("target", target if uses_target else None), ("pool-sample", pool_sample if uses_pool_sample else None))
    for what, features in used:
        if features is None:
            continue
        bad_image = ~torch.isfinite(features.image).all(1)
        bad_text = ~torch.isfinite(features.text).all(1)
        bad = (bad_image | bad_text).cpu()
        if bool(bad.any()):
            sides = " and ".join(side for side, b in (("image", bad_image), ("text", bad_text)) if bool(b.any()))
            first = features.ids.cpu()[bad][:5].tolist()
            raise FloatingPointError(
                f"{name}: {int(bad.sum())} of the {len(features)} {what} pairs have NaN or inf {sides} features "
                f"(round {scorer.round}, first ids {first}): the model may have diverged (check the training loss, "
                "learning rate and precision) or the features are corrupt."
            )
