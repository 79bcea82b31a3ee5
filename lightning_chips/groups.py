"""Groups of the pool: metadata fields a user names (``group_by=["source", "label"]``) kept per scored pair, so a
round can say which share of the pool and of the selection each group holds, and whether the scorer starves one.

A field's value for a pair is read from the batch: the item's own field (map-style items ``{"image", "text", "id",
"source": ...}``), else the field of a WebDataset sample's ``.json``; a pair without it is in the group
:data:`MISSING`. Values are kept as strings (``"1"``, ``"True"``, ``"web"``). Memory is bounded: one int64 per pair
and field while scoring (a stable hash of the value, so ranks agree without talking), and at most
:data:`MAX_GROUP_VALUES` distinct values per field; later new values are counted in :data:`OTHER`.

**Value names.** A field whose values are codes (``domain`` 0 / 1) is reported by name (``domain=target``) when the
data names them: a pool dataset's ``group_labels`` attribute (``{"domain": ("general", "target")}``: a sequence names
the values 0, 1, ...; a mapping names any value; read through ``Subset`` and ``ConcatDataset``), or the callback's
``group_labels=`` (which wins). The name replaces the value everywhere: round files, metrics, the round line, the
report.

In a round file (and ``scores.npz``) a field ``i`` of ``group_fields`` is two arrays: ``group_values_{i}`` (the
distinct values) and ``group_codes_{i}`` (int32 per pair, aligned with ``ids``, indexing the values).

Example::

    >>> import numpy as np
    >>> column = GroupColumn.from_values(np.array(["web", "book", "web", "web"]))
    >>> shares = column.shares(np.array([True, True, False, False]))
    >>> [(s.value, s.pool_share, s.selected_share, round(s.kept, 2)) for s in shares]
    [('book', 0.25, 0.5, 1.0), ('web', 0.75, 0.5, 0.33)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_chips.ids import id_key

__all__ = [
    "MAX_GROUP_VALUES",
    "MAX_LOGGED_GROUPS",
    "MISSING",
    "OTHER",
    "GroupColumn",
    "GroupEncoder",
    "GroupShare",
    "check_group_by",
    "check_group_labels",
    "dataset_group_labels",
    "group_arrays",
    "group_metrics",
    "read_group_arrays",
    "starved_text",
]

MISSING = "(missing)"
"""The group of a pair that has no value for the field."""

OTHER = "(other)"
"""The group of the values of a field beyond its first :data:`MAX_GROUP_VALUES` distinct ones."""

MAX_GROUP_VALUES = 1024
"""Distinct values kept per field (per rank while scoring); the rest are counted together in :data:`OTHER`."""

_RESERVED = ("image", "text", "id", "index", "order", "json")


def check_group_by(group_by: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate ``group_by``: a list of distinct, non-empty field names (a string is a comma-separated list, as
    ``--group-by source,label`` gives)."""
    if group_by is None:
        return ()
    fields = tuple(f.strip() for f in group_by.split(",")) if isinstance(group_by, str) else tuple(group_by)
    for field in fields:
        if not isinstance(field, str) or not field:
            raise ValueError(f"`group_by` must be a list of field names (non-empty strings), got {group_by!r}.")
        if field in _RESERVED:
            raise ValueError(f"`group_by` cannot name {field!r}: it is not metadata. Reserved: {_RESERVED}.")
    if len(set(fields)) != len(fields):
        raise ValueError(f"`group_by` names a field twice: {list(fields)}.")
    return fields


def check_group_labels(
    labels: Mapping[str, Mapping[Any, str] | Sequence[str]] | None, fields: Sequence[str] | None = None
) -> dict[str, dict[str, str]]:
    """Validate value names per field: ``{field: {value: name}}`` or ``{field: [name of 0, name of 1, ...]}``; values
    are matched as text (``1``, ``"1"`` and ``1.0`` are one value). With ``fields``, every named field must be one
    of them. Returns ``{field: {value text: name}}``.

    Example::

        >>> check_group_labels({"domain": ["general", "target"], "source": {"w": "web"}})
        {'domain': {'0': 'general', '1': 'target'}, 'source': {'w': 'web'}}
    """
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValueError(f"`group_labels` must map a field to its value names, e.g. {_LABELS_EXAMPLE}; got {labels!r}.")
    out: dict[str, dict[str, str]] = {}
    for field, names in labels.items():
        if fields is not None and field not in fields:
            raise ValueError(f"`group_labels` names field {field!r}, which is not in `group_by` {list(fields)}.")
        if isinstance(names, Mapping):
            pairs = [(_as_text(value), name) for value, name in names.items()]
        elif isinstance(names, Sequence) and not isinstance(names, str):
            pairs = [(str(i), name) for i, name in enumerate(names)]
        else:
            raise ValueError(
                f"`group_labels[{field!r}]` must be a list of names or a value -> name mapping, e.g. "
                f"{_LABELS_EXAMPLE}; got {names!r}."
            )
        for value, name in pairs:
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"`group_labels[{field!r}]` names value {value!r} {name!r}: names are non-empty strings."
                )
        named = [name for _, name in pairs]
        if len(set(named)) != len(named):
            raise ValueError(f"`group_labels[{field!r}]` gives two values one name: {named}; names must be distinct.")
        out[field] = dict(pairs)
    return out


_LABELS_EXAMPLE = '{"domain": ["general", "target"]} or {"domain": {"0": "general", "1": "target"}}'


def dataset_group_labels(dataset: Any) -> dict[str, dict[str, str]]:
    """The value names a dataset declares in its ``group_labels`` attribute (checked as in
    :func:`check_group_labels`), looking through ``Subset`` (``.dataset``) and ``ConcatDataset`` (``.datasets``; a
    field two parts name differently is left unnamed). ``{}`` when nothing declares any."""
    declared = getattr(dataset, "group_labels", None)
    if declared is not None:
        return check_group_labels(declared)
    if isinstance(getattr(dataset, "datasets", None), Sequence):
        merged: dict[str, dict[str, str]] = {}
        conflicting: set[str] = set()
        for part in dataset.datasets:
            for field, names in dataset_group_labels(part).items():
                known = merged.setdefault(field, {})
                if any(known.get(value, name) != name for value, name in names.items()):
                    conflicting.add(field)
                known.update(names)
        return {field: names for field, names in merged.items() if field not in conflicting}
    inner = getattr(dataset, "dataset", None)
    return dataset_group_labels(inner) if inner is not None and inner is not dataset else {}


def _as_text(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def batch_values(batch: Mapping[str, Any], field: str, n: int) -> list[str]:
    """The ``n`` pairs' values of ``field`` in a collated batch, as strings (:data:`MISSING` where absent)."""
    if field in batch:
        raw = batch[field]
        values = raw.tolist() if isinstance(raw, Tensor | np.ndarray) else list(raw)
    elif isinstance(batch.get("json"), list | tuple):
        values = [meta.get(field) if isinstance(meta, Mapping) else None for meta in batch["json"]]
    else:
        values = [None] * n
    if len(values) != n:
        raise ValueError(f"The batch's field {field!r} has {len(values)} values for {n} pairs.")
    return [_as_text(v) for v in values]


class GroupEncoder:
    """Per pair and field, an int64 key of the value (stable across ranks and runs), and the values seen.

    Args:
        fields: the field names (see :func:`check_group_by`).
        max_values: distinct values kept per field; later ones are :data:`OTHER`.
        labels: names of values per field (:func:`check_group_labels`'s output); a named value is kept as its name.
    """

    def __init__(
        self,
        fields: Sequence[str],
        max_values: int = MAX_GROUP_VALUES,
        labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.fields = tuple(fields)
        self.max_values = max_values
        self._labels = [dict((labels or {}).get(field, {})) for field in self.fields]
        self.values: list[dict[int, str]] = [{} for _ in self.fields]
        self._known: list[dict[str, int]] = [{} for _ in self.fields]  # value -> key (OTHER's for late values)

    def __call__(self, batch: Mapping[str, Any], n: int) -> Tensor:
        """``[n, F]`` keys of the batch's pairs."""
        keys = torch.empty(n, len(self.fields), dtype=torch.int64)
        for f, field in enumerate(self.fields):
            seen, known, names = self.values[f], self._known[f], self._labels[f]
            column = []
            for value in batch_values(batch, field, n):
                value = names.get(value, value)
                key = known.get(value)
                if key is None:
                    key = id_key(value)
                    if len(seen) >= self.max_values and key not in seen:
                        value, key = OTHER, id_key(OTHER)
                    seen.setdefault(key, value)
                    if len(known) < 4 * self.max_values:  # bounded: past it, late values are hashed each time
                        known[value] = key
                column.append(key)
            keys[:, f] = torch.tensor(column, dtype=torch.int64)
        return keys

    def columns(self, keys: np.ndarray, values: Sequence[dict[int, str]] | None = None) -> dict[str, GroupColumn]:
        """The :class:`GroupColumn` of each field for ``[N, F]`` keys (``values``: the merged key -> value maps of
        every rank; default this encoder's)."""
        values = self.values if values is None else values
        out = {}
        for f, field in enumerate(self.fields):
            unique, codes = np.unique(keys[:, f], return_inverse=True)
            names = np.array([values[f].get(int(k), OTHER) for k in unique], dtype=str)
            out[field] = GroupColumn.from_values(names[codes]) if len(unique) else GroupColumn.empty()
        return out


@dataclass(frozen=True)
class GroupShare:
    """One group of a field in one round: pairs in the pool and in the selection, and their shares."""

    value: str
    pool: int
    selected: int
    pool_share: float  # share of the pool's pairs in this group
    selected_share: float  # share of the selection's pairs in this group
    kept: float  # share of this group's pairs that were selected


@dataclass(frozen=True)
class GroupColumn:
    """A field's value for each pair: ``values[codes]`` (``values`` sorted, distinct; ``codes`` int32 per pair)."""

    values: np.ndarray
    codes: np.ndarray

    @classmethod
    def from_values(cls, per_pair: np.ndarray) -> GroupColumn:
        values, codes = np.unique(np.asarray(per_pair, dtype=str), return_inverse=True)
        return cls(values, codes.astype(np.int32).reshape(-1))

    @classmethod
    def empty(cls) -> GroupColumn:
        return cls(np.zeros(0, dtype=str), np.zeros(0, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.codes)

    def labels(self) -> np.ndarray:
        """The value of each pair."""
        return self.values[self.codes]

    def take(self, rows: np.ndarray) -> GroupColumn:
        return GroupColumn(self.values, self.codes[rows])

    def capped(self, max_values: int = MAX_GROUP_VALUES) -> GroupColumn:
        """This column with at most ``max_values`` values: the most frequent keep theirs, the rest are
        :data:`OTHER`."""
        if len(self.values) <= max_values:
            return self
        counts = np.bincount(self.codes, minlength=len(self.values))
        keep = np.zeros(len(self.values), dtype=bool)
        keep[np.argsort(-counts, kind="stable")[: max_values - 1]] = True
        return GroupColumn.from_values(np.where(keep[self.codes], self.values[self.codes], OTHER))

    @staticmethod
    def cat(columns: Sequence[GroupColumn]) -> GroupColumn:
        """The columns one after another (values merged)."""
        if not columns:
            return GroupColumn.empty()
        values = np.unique(np.concatenate([c.values for c in columns]))
        codes = [np.searchsorted(values, c.values).astype(np.int32)[c.codes] for c in columns]
        return GroupColumn(values, np.concatenate(codes).astype(np.int32))

    def shares(self, selected: np.ndarray) -> list[GroupShare]:
        """Per group (in value order): pool and selection counts and shares, and the share of the group kept."""
        selected = np.asarray(selected, dtype=bool)
        if selected.shape != self.codes.shape:
            raise ValueError(f"`selected` must have one entry per pair ({len(self.codes)}), got {selected.shape}.")
        pool = np.bincount(self.codes, minlength=len(self.values))
        chosen = np.bincount(self.codes[selected], minlength=len(self.values))
        n, k = max(int(pool.sum()), 1), max(int(chosen.sum()), 1)
        return [
            GroupShare(str(v), int(p), int(c), float(p / n), float(c / k), float(c / p) if p else 0.0)
            for v, p, c in zip(self.values, pool, chosen, strict=True)
        ]


def group_arrays(columns: Mapping[str, GroupColumn], order: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The round-file arrays of ``columns`` (codes reordered by ``order`` when given): ``group_fields``,
    ``group_values_{i}``, ``group_codes_{i}``."""
    if not columns:
        return {}
    arrays: dict[str, np.ndarray] = {"group_fields": np.array(list(columns), dtype=str)}
    for i, column in enumerate(columns.values()):
        arrays[f"group_values_{i}"] = np.asarray(column.values, dtype=str)
        arrays[f"group_codes_{i}"] = (column.codes if order is None else column.codes[order]).astype(np.int32)
    return arrays


def read_group_arrays(arrays: Mapping[str, np.ndarray], n: int | None = None) -> dict[str, GroupColumn]:
    """The group columns of a loaded round file or ``scores.npz`` (empty when it has none).

    Raises:
        ValueError: a field without its values or codes, or (given ``n``, the number of pairs) codes that are not
            one per pair or point outside the values: a damaged file.
    """
    if "group_fields" not in arrays:
        return {}
    columns = {}
    for i, field in enumerate(str(f) for f in np.asarray(arrays["group_fields"]).reshape(-1)):
        values, codes = arrays.get(f"group_values_{i}"), arrays.get(f"group_codes_{i}")
        if values is None or codes is None:
            raise ValueError(f"group field {field!r} lacks group_values_{i} / group_codes_{i}")
        values, codes = np.asarray(values, dtype=str).reshape(-1), np.asarray(codes).reshape(-1)
        if n is not None and len(codes) != n:
            raise ValueError(f"group_codes_{i} ({field!r}) has {len(codes)} codes for {n} ids")
        if len(codes) and (codes.min() < 0 or codes.max() >= len(values)):
            raise ValueError(f"group_codes_{i} ({field!r}) holds codes outside [0, {len(values)}) (its values)")
        columns[field] = GroupColumn(values, codes)
    return columns


MAX_LOGGED_GROUPS = 20
"""Groups per field whose shares are logged each round (the largest in the pool); the round file keeps all."""


def group_metrics(groups: Mapping[str, GroupColumn], selected: np.ndarray) -> dict[str, float]:
    """The logged shares of a round: ``group/FIELD=VALUE/{pool,selected,kept}`` for the :data:`MAX_LOGGED_GROUPS`
    largest groups of each field."""
    metrics = {}
    for field, column in groups.items():
        shares = sorted(column.shares(selected), key=lambda s: (-s.pool, s.value))[:MAX_LOGGED_GROUPS]
        for share in shares:
            name = f"group/{field}={share.value}"
            metrics[f"{name}/pool"] = share.pool_share
            metrics[f"{name}/selected"] = share.selected_share
            metrics[f"{name}/kept"] = share.kept
    return metrics


def shares_text(groups: Mapping[str, GroupColumn], selected: np.ndarray, top: int = 3) -> str:
    """``; selection vs pool: domain=1 61.5% (20.0%), domain=0 38.5% (80.0%); noisy=True 4.8% (10.0%)``: each
    field's ``top`` largest groups of the pool, their share of the selection and (in brackets) of the pool; ``""``
    without groups."""
    parts = []
    for field, column in groups.items():
        shares = sorted(column.shares(selected), key=lambda s: (-s.pool, s.value))[:top]
        if shares:
            parts.append(", ".join(f"{field}={s.value} {s.selected_share:.1%} ({s.pool_share:.1%})" for s in shares))
    return f"; selection vs pool: {'; '.join(parts)}" if parts else ""


def starved_text(groups: Mapping[str, GroupColumn], selected: np.ndarray, fraction: float) -> str:
    """``; starved: field=value kept 0.4% (of 1,280 pairs; 30.0% overall)`` for groups kept at under a tenth of the
    overall rate (the worst two), or ``""``."""
    starved = [(share.kept, field, share) for field, column in groups.items() for share in column.shares(selected)
               if share.pool and share.kept < 0.1 * fraction]  # fmt: skip
    if not starved:
        return ""
    named = ", ".join(f"{field}={s.value} kept {s.kept:.1%} of its {s.pool:,} pairs"
                      for _, field, s in sorted(starved, key=lambda t: t[0])[:2])  # fmt: skip
    return f"; starved groups: {named} ({fraction:.1%} overall)"
