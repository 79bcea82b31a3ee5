"""Per-round selection reports: group shares kept in round files and logged, score histograms, and galleries of the
top, bottom, entered and left pairs, through TensorBoard's and CSV's loggers (tiny fits, CPU)."""

from __future__ import annotations

import copy
import csv
import io
import json

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips import gallery as g
from lightning_chips.data import WebDatasetDataModule
from lightning_chips.data.builtin import DOMAINS
from lightning_chips.groups import MAX_GROUP_VALUES, OTHER, GroupColumn, GroupEncoder, read_group_arrays
from lightning_chips.report import build_report
from lightning_chips.scoring import CHIPS

from .conftest import TINY_VIT
from .shards import write_pool
from .test_report import Page

K = 4


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)


def _trainer(tmp_path, callbacks, loggers, max_epochs=3) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=loggers,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        default_root_dir=tmp_path,
    )  # fmt: skip


def _pool(n=240, target_fraction=0.3, noise=0.2):
    return TwoDomainPairs(n, noise_fraction=noise, target_fraction=target_fraction)


def _datamodule(pool) -> ScoredSubsetDataModule:
    return ScoredSubsetDataModule(pool, TwoDomainPairs(16, target_fraction=1.0, split="val"), batch_size=8,
                                  steps_per_round=4, eval_batch_size=64)  # fmt: skip


def _gallery(path) -> list[g.GalleryPair]:
    f = np.load(path)
    columns = zip(f["ids"], f["kinds"], f["scores"], f["captions"], f["thumbnails"], strict=True)
    return [g.GalleryPair(i.item(), str(k), float(s), str(c), t) for i, k, s, c, t in columns]


def _top_ids(round_file, k):
    f = np.load(round_file)
    order = np.lexsort((f["ids"], -f["scores"].astype(np.float64)))
    return f["ids"][order[:k]].tolist()


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Three CHIPS rounds on a 240-pair pool with group_by and galleries, logged to TensorBoard and CSV."""
    tmp_path = tmp_path_factory.mktemp("reports")
    pool = _pool()
    rounds = tmp_path / "rounds"
    callback = DataSelectionCallback(CHIPS(sketch_dim=96, bank_size=48, curvature_samples=96), fraction=0.3,
                                     every_n_epochs=1, save_dir=str(rounds), group_by=["domain", "noisy"],
                                     gallery=K, thumbnail_size=32)  # fmt: skip
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    trainer = _trainer(tmp_path, [callback], loggers)
    trainer.fit(_module(), datamodule=_datamodule(pool))
    return {"pool": pool, "rounds": rounds, "callback": callback, "loggers": loggers, "trainer": trainer}


def _round_files(run):
    return sorted(run["rounds"].glob("round_????.npz"))


def test_round_files_keep_each_pairs_group(logged_run):
    pool = logged_run["pool"]
    files = _round_files(logged_run)
    assert len(files) == 3
    by_id = {int(i): index for index, i in enumerate(pool.ids)}
    for path in files:
        f = np.load(path)
        groups = read_group_arrays(f)
        assert list(groups) == ["domain", "noisy"]
        rows = [by_id[int(i)] for i in f["ids"]]
        # the built-in pool names its domains (TwoDomainPairs.group_labels): 0 -> "general", 1 -> "target"
        assert groups["domain"].labels().tolist() == [DOMAINS[int(pool.domains[r])] for r in rows]
        assert groups["noisy"].labels().tolist() == [str(bool(pool.noisy[r])) for r in rows]
        settings = json.loads(str(f["settings"]))
        assert settings["group_by"] == ["domain", "noisy"] and settings["fraction"] == 0.3


def _expected_shares(path):
    f = np.load(path)
    out = {}
    for field, column in read_group_arrays(f).items():
        for share in column.shares(f["selected"]):
            name = f"selection/group/{field}={share.value}"
            out[f"{name}/pool"], out[f"{name}/selected"], out[f"{name}/kept"] = (
                share.pool_share, share.selected_share, share.kept)  # fmt: skip
    return out


def test_csv_logger_has_the_group_shares_of_each_round_file(logged_run):
    csv_logger = logged_run["loggers"][1]
    with open(f"{csv_logger.log_dir}/metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("selection/round")]
    assert [float(r["selection/round"]) for r in rows] == [0.0, 1.0, 2.0]
    for row, path in zip(rows, _round_files(logged_run), strict=True):
        expected = _expected_shares(path)
        assert len(expected) == 3 * (2 + 2)  # two values per field, three shares each
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(value, abs=1e-6), name


def test_tensorboard_has_scalars_histograms_and_galleries_of_each_round(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = logged_run["loggers"][0]
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    steps = [int(e.step) for e in events.Scalars("selection/round")]
    assert len(steps) == 3
    for path, step in zip(_round_files(logged_run), steps, strict=True):
        for name, value in _expected_shares(path).items():
            logged = {int(e.step): e.value for e in events.Scalars(name)}
            assert logged[step] == pytest.approx(value, abs=1e-6)
    assert [int(h.step) for h in events.Histograms("selection/scores")] == steps
    assert {"selection/top", "selection/bottom", "selection/entered", "selection/left"} <= set(tags["images"])
    for r, (path, step) in enumerate(zip(_round_files(logged_run), steps, strict=True)):
        pairs = _gallery(g.gallery_path(path))
        top = [p for p in pairs if p.kind == "top"]
        assert [p.id for p in top] == _top_ids(path, K)  # the gallery holds the round file's top-k ...
        image = {int(e.step): e for e in events.Images("selection/top")}[step]
        expected = g.render_grid(top, f"round {r}: top {K}")
        assert np.array_equal(_decode(image.encoded_image_string), expected)  # ... and the logged grid shows them
        kinds = {e.step for e in events.Images("selection/entered")}
        assert (step in kinds) == (r > 0)


def test_csv_logger_gets_png_files_beside_the_round_files(logged_run):
    for r, path in enumerate(_round_files(logged_run)):
        pairs = _gallery(g.gallery_path(path))
        kinds = ["top", "bottom"] + (["entered", "left"] if r else [])
        for kind in kinds:
            png = path.with_name(f"round_{r:04d}_{kind}.png")
            expected = g.render_grid([p for p in pairs if p.kind == kind], f"round {r}: {kind} {K}")
            assert np.array_equal(_decode(png.read_bytes()), expected)
        assert path.with_name(f"round_{r:04d}_scores.png").exists()  # CSV has no histogram


def test_entered_and_left_galleries_follow_the_round_files(logged_run):
    files = _round_files(logged_run)
    for before, now in zip(files, files[1:], strict=False):
        previous, current = np.load(before), np.load(now)
        was = set(previous["ids"][previous["selected"]].tolist())
        is_ = set(current["ids"][current["selected"]].tolist())
        pairs = _gallery(g.gallery_path(now))
        entered = [p.id for p in pairs if p.kind == "entered"]
        left = [p.id for p in pairs if p.kind == "left"]
        assert entered and left
        assert all(i in is_ and i not in was for i in entered)
        assert all(i in was and i not in is_ for i in left)


def test_gallery_thumbnails_are_the_pools_images(logged_run):
    pool = logged_run["pool"]
    by_id = {int(i): index for index, i in enumerate(pool.ids)}
    pairs = _gallery(g.gallery_path(_round_files(logged_run)[0]))
    for pair in pairs:
        item = pool[by_id[pair.id]]
        assert pair.caption == item["text"]
        assert np.array_equal(pair.image, g.thumbnail(item["image"], 32))


def test_a_starved_group_is_named_and_logged(tmp_path, caplog):
    """NormSim scores pool images by their similarity to the target domain's: on a pool of half general-domain
    pairs it selects (almost) none of them, and the logs must say so, naming the groups as the data names them (the
    built-in pool names its domains) or as ``group_labels=`` does."""
    labels = {"noisy": {"False": "clean"}}
    callback = DataSelectionCallback("normsim", fraction=0.2, save_dir=str(tmp_path / "rounds"),
                                     group_by=["domain", "noisy"], group_labels=labels)  # fmt: skip
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level("INFO"):
        _trainer(tmp_path, [callback], [logger], max_epochs=1).fit(
            _module(), datamodule=_datamodule(_pool(target_fraction=0.5, noise=0.0)))  # fmt: skip
    metrics = callback.history[-1]
    assert metrics["group/domain=general/pool"] == pytest.approx(0.5)
    assert metrics["group/noisy=clean/pool"] == 1.0 and not any("=0/" in k or "=False/" in k for k in metrics)
    assert metrics["group/domain=general/kept"] < 0.02 and metrics["group/domain=target/selected"] > 0.9
    assert "starved groups: domain=general kept" in caplog.text
    # the round line gives each group's share of the selection beside its share of the pool
    s1, s0 = metrics["group/domain=target/selected"], metrics["group/domain=general/selected"]
    assert f"selection vs pool: domain=general {s0:.1%} (50.0%), domain=target {s1:.1%} (50.0%)" in caplog.text
    f = np.load(tmp_path / "rounds" / "round_0000.npz")
    shares = {s.value: s for s in read_group_arrays(f)["domain"].shares(f["selected"])}
    assert shares["general"].kept == pytest.approx(metrics["group/domain=general/kept"])
    page = Page(build_report(tmp_path / "rounds"))  # and the report marks it
    groups = [row for row in page.rows if row["section"] == "groups" and row["cells"][:1] == ["0"]]
    starved = {row["cells"][1]: "starved" in row["class"].split() for row in groups}
    assert starved["general"] and not starved["target"], starved


def test_group_labels_are_checked_eagerly():
    with pytest.raises(ValueError, match="not in `group_by`"):
        DataSelectionCallback("random", group_by=["domain"], group_labels={"source": ["a"]})
    with pytest.raises(ValueError, match="distinct"):
        DataSelectionCallback("random", group_by=["domain"], group_labels={"domain": ["a", "a"]})
    with pytest.raises(ValueError, match="list of names or a value -> name mapping"):
        DataSelectionCallback("random", group_by=["domain"], group_labels={"domain": "general"})


def test_galleries_off_read_nothing_from_the_pool(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("gallery=0 must not read pairs back")

    monkeypatch.setattr(g, "load_pairs", fail)
    callback = DataSelectionCallback("random", fraction=0.3, save_dir=str(tmp_path / "rounds"))
    _trainer(tmp_path, [callback], [CSVLogger(tmp_path)], max_epochs=1).fit(_module(), datamodule=_datamodule(_pool()))
    names = sorted(p.name for p in (tmp_path / "rounds").iterdir())
    assert names == ["round_0000.npz", "round_0000_scores.png"]
    assert "group_fields" not in np.load(tmp_path / "rounds" / "round_0000.npz")


def test_shard_pool_groups_come_from_the_json_and_galleries_from_the_shards(tmp_path):
    pairs = write_pool(tmp_path / "pool", 48, per_shard=8, json_fields=("domain",))
    metadata = TwoDomainPairs(48, target_fraction=0.3, image_size=32)
    data = WebDatasetDataModule(str(tmp_path / "pool"), TwoDomainPairs(16, target_fraction=1.0, split="val"),
                                batch_size=8, steps_per_round=2, eval_batch_size=16)  # fmt: skip
    callback = DataSelectionCallback(CHIPS(sketch_dim=64, bank_size=16, curvature_samples=32), fraction=0.25,
                                     save_dir=str(tmp_path / "rounds"), group_by=["domain", "source"], gallery=3,
                                     thumbnail_size=32)  # fmt: skip
    _trainer(tmp_path, [callback], [CSVLogger(tmp_path)], max_epochs=1).fit(_module(), datamodule=data)
    path = tmp_path / "rounds" / "round_0000.npz"
    f = np.load(path)
    groups = read_group_arrays(f)
    expected = [str(int(metadata.domains[int(uid) - 10**12])) for uid in f["ids"]]
    assert groups["domain"].labels().tolist() == expected
    assert set(groups["source"].labels().tolist()) == {"(missing)"}  # no such json field
    gallery = _gallery(g.gallery_path(path))
    top = [p for p in gallery if p.kind == "top"]
    assert [p.id for p in top] == _top_ids(path, 3)
    for pair in top:
        assert pair.caption == pairs[pair.id]["text"]
        assert np.array_equal(pair.image, g.thumbnail(Image.open(io.BytesIO(pairs[pair.id]["png"])), 32))


def test_score_keeps_the_json_fields_named_by_group_by(tmp_path):
    from lightning_chips.offline import read_scores, score_pool

    write_pool(tmp_path / "pool", 40, per_shard=8, json_fields=("domain", "label"))
    metadata = TwoDomainPairs(40, target_fraction=0.3, image_size=32)
    write_pool(tmp_path / "target", 8, per_shard=8, prefix="target", target_fraction=1.0, split="val",
               uid_offset=10**13)  # fmt: skip
    pl.seed_everything(0)
    score_pool(_module(), CHIPS(sketch_dim=64, bank_size=16, curvature_samples=32), str(tmp_path / "pool"),
               str(tmp_path / "scores"), str(tmp_path / "target"), batch_size=16, num_workers=0, pool_sample=None,
               group_by=["domain", "label"])  # fmt: skip
    scores = read_scores(tmp_path / "scores")
    groups = read_group_arrays(scores)
    rows = [int(uid) - 10**12 for uid in scores["ids"]]
    assert groups["domain"].labels().tolist() == [str(int(metadata.domains[r])) for r in rows]
    assert groups["label"].labels().tolist() == [str(int(metadata.labels[r])) for r in rows]
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert manifest["group_by"] == ["domain", "label"]


def test_group_values_are_capped_and_keys_agree_across_encoders():
    encoder = GroupEncoder(["source"], max_values=3)
    keys = encoder({"source": ["a", "b", "c", "d", "e", "a"]}, 6)
    column = encoder.columns(keys.numpy())["source"]
    assert column.labels().tolist() == ["a", "b", "c", OTHER, OTHER, "a"]
    other = GroupEncoder(["source"])  # another rank: the same value has the same key
    assert other({"json": [{"source": "c"}]}, 1)[0, 0] == keys[2, 0]
    assert MAX_GROUP_VALUES >= 256
    big = GroupColumn.from_values(np.array([f"v{i % 50}" for i in range(500)] + ["rare"]))
    assert len(big.capped(10).values) == 10 and OTHER in big.capped(10).values.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"group_by": ["id"]}, "cannot name 'id'"), ({"group_by": ["a", "a"]}, "twice"),
     ({"gallery": -1}, "`gallery` must be >= 0"), ({"thumbnail_size": 4}, "thumbnail_size")],
)  # fmt: skip
def test_report_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataSelectionCallback("random", **kwargs)
