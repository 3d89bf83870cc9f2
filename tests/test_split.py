"""The split: stratified, seeded, written as ids; duplicates never straddle it; a user's split file is honoured."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layouts import CLASSES, Item, clean_items, duplicate_items, hf_cache, write_csv, write_kaggle  # noqa: F401

from vlfit.config import DataConfig
from vlfit.data import prepare_data, stratified_split, survey_data
from vlfit.data.duplicates import near_pairs
from vlfit.errors import UserError


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=2, max_size=80), group_size=st.integers(1, 4),
       fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**31))
def test_grouped_split_never_straddles_and_never_exceeds_quotas(labels, group_size, fraction, seed):
    labels = np.array(labels)
    groups = np.arange(len(labels)) // group_size  # runs of neighbours form groups
    split = stratified_split(labels, fraction, seed, groups)
    assert sorted([*split.train, *split.val]) == list(range(len(labels)))
    assert len(split.straddling(groups)) == 0
    quota = np.rint(np.bincount(labels, minlength=4) * fraction)
    assert np.all(np.bincount(labels[split.val], minlength=4) <= quota)
    again = stratified_split(labels, fraction, seed, groups)
    assert np.array_equal(again.val, split.val)


def test_single_images_meet_every_class_quota_exactly():
    labels = np.repeat(np.arange(15), 840)  # HAR: 840 images in each of 15 classes
    split = stratified_split(labels, 0.2, seed=42)
    assert (len(split.train), len(split.val)) == (10_080, 2_520)
    assert np.bincount(labels[split.val]).tolist() == [168] * 15


def test_groups_go_to_validation_about_as_often_as_single_images():
    labels = np.repeat(np.arange(2), 500)
    groups = np.arange(1000)
    groups[:200] = np.arange(200) // 2  # 100 pairs in class 0
    in_val = [np.isin(np.arange(0, 200, 2), stratified_split(labels, 0.2, s, groups).val).mean() for s in range(20)]
    assert 0.1 < np.mean(in_val) < 0.3


def test_near_pairs_require_both_hashes_within_distance():
    phash = np.array([0, 0b111, 0, 2**64 - 1], dtype=np.uint64)
    dhash = np.array([0, 0, 0b11111111, 2**64 - 1], dtype=np.uint64)
    i, j = near_pairs(phash, dhash, distance=3)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1)]


@pytest.fixture
def with_duplicates(tmp_path):
    """A Kaggle download holding clean images plus exact copies (same bytes, same pixels) and near copies."""
    items = clean_items(per_class=10)
    return items, write_kaggle(tmp_path / "k", items + duplicate_items(items))


def test_planted_duplicates_are_found_and_never_straddle_the_split(with_duplicates, tmp_path):
    items, kaggle = with_duplicates
    cfg = DataConfig(source="kaggle", path=str(kaggle))
    survey = survey_data(cfg)
    found = sorted((g.kind, sorted(survey.entries[m].name for m in g.members)) for g in survey.groups)
    assert found == [("exact", sorted([items[0].filename, "copy_of_first.jpg", "first_as.png"])),
                     ("near", sorted([items[1].filename, "second_q60.jpg", "second_big.jpg"]))]
    images, origin, groups = survey.image_set()
    for seed in range(25):
        assert len(stratified_split(images.labels, 0.2, seed, groups).straddling(groups)) == 0
    images, split = prepare_data(cfg.model_copy(update={"split_seed": 7}), tmp_path)
    record = json.loads((tmp_path / "split.json").read_text())
    for group in json.loads((tmp_path / "duplicates.json").read_text())["groups"]:
        sides = {"train" if m["id"] in record["train"] else "val" for m in group["members"]}
        assert len(sides) == 1


def test_near_duplicate_search_can_be_turned_off(with_duplicates):
    _, kaggle = with_duplicates
    survey = survey_data(DataConfig(source="kaggle", path=str(kaggle), near_duplicate_distance=None))
    assert [g.kind for g in survey.groups] == ["exact"]


def test_drop_mode_keeps_one_copy_and_drops_copies_whose_labels_disagree(tmp_path):
    items = clean_items(per_class=6)
    planted = [Item("again.jpg", items[0].label, items[0].data),
               Item("disputed.jpg", items[2].label if items[2].label != items[1].label else CLASSES[0], items[1].data)]
    kaggle = write_kaggle(tmp_path / "k", items + planted)
    images, split = prepare_data(DataConfig(source="kaggle", path=str(kaggle), exact_duplicates="drop",
                                            near_duplicate_distance=None), tmp_path)
    assert len(images) == len(items) - 1  # one of items[0]'s copies kept; both disputed copies dropped
    assert items[1].filename not in images.names and "disputed.jpg" not in images.names
    assert len(set(images.ids)) == len(images)
    record = json.loads((tmp_path / "duplicates.json").read_text())
    assert record["dropped"] == 3
    reasons = [m.get("dropped", "") for g in record["groups"] for m in g["members"]]
    assert sum("conflicting labels" in r for r in reasons) == 2


def test_split_file_by_file_names_is_used_and_written_as_ids(tmp_path):
    items = clean_items(per_class=5)
    kaggle = write_kaggle(tmp_path / "k", items)
    chosen = tmp_path / "my_split.json"
    names = [it.filename for it in items]
    chosen.write_text(json.dumps({"train": names[3:], "val": names[:3]}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    images, split = prepare_data(DataConfig(source="kaggle", path=str(kaggle), split_file=str(chosen)), run_dir)
    assert sorted(images.names[i] for i in split.val) == sorted(it.filename for it in items[:3])
    written = json.loads((run_dir / "split.json").read_text())
    assert written["val"] == sorted(images.ids[i] for i in split.val) and written["split_file"] == str(chosen)
    # The written file is itself a valid split file and reproduces the split.
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    _, again = prepare_data(DataConfig(source="kaggle", path=str(kaggle), split_file=str(run_dir / "split.json")),
                            again_dir)
    assert np.array_equal(again.val, split.val) and np.array_equal(again.train, split.train)


def test_split_file_that_leaks_duplicates_is_refused(with_duplicates, tmp_path):
    items, kaggle = with_duplicates
    names = [it.filename for it in items]
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps({"train": names[2:] + ["copy_of_first.jpg"], "val": names[:2]}))
    with pytest.raises(UserError, match="data.split_file: 1 groups of duplicate images have copies in both"):
        prepare_data(DataConfig(source="kaggle", path=str(kaggle), split_file=str(leaky)), tmp_path)


@pytest.mark.parametrize("content,expected", [
    ({"train": ["nope.jpg"], "val": []}, "1 image ids are not in the dataset"),
    ({"train": ["Image_1.jpg"], "val": ["Image_1.jpg"]}, "in both train and val"),
    ({"training": []}, "not a JSON object with 'train' and 'val' lists"),
])
def test_bad_split_files_are_clear_errors(tmp_path, content, expected):
    kaggle = write_kaggle(tmp_path / "k", clean_items(per_class=3))
    (tmp_path / "s.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=expected):
        prepare_data(DataConfig(source="kaggle", path=str(kaggle), split_file=str(tmp_path / "s.json")), tmp_path)


def test_identical_files_get_distinct_ids_in_every_layout(tmp_path):
    items = clean_items(per_class=3)
    twins = items + [Item("twin.jpg", items[0].label, items[0].data)]
    ids = []
    for source, path in (("kaggle", write_kaggle(tmp_path / "k", twins)), ("csv", write_csv(tmp_path / "c", twins))):
        survey = survey_data(DataConfig(source=source, path=str(path)))
        ids.append(sorted(e.id for e in survey.entries))
    assert ids[0] == ids[1] and len(set(ids[0])) == len(twins)
