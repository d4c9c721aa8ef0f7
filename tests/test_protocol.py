import pytest

from osad_core.data import DataError, load_folder
from osad_core.protocol import Protocol, make_split


def test_general_removes_drawn_anomalies_from_test(mvtec_dir):
    ds = load_folder(mvtec_dir)
    sp = make_split(ds, Protocol("general", 3, seed=1))
    assert len(sp.train_anomalies) == 3
    drawn = {r.path for r in sp.train_anomalies}
    assert not drawn & {r.path for r in sp.test}
    assert sum(r.label == 1 for r in sp.test) == 12 - 3
    assert sum(r.label == 0 for r in sp.test) == 6


def test_draw_is_seeded_and_independent_of_listing_order(mvtec_dir):
    ds = load_folder(mvtec_dir)
    a = make_split(ds, Protocol("general", 4, seed=7))
    ds.records.reverse()
    b = make_split(ds, Protocol("general", 4, seed=7))
    c = make_split(ds, Protocol("general", 4, seed=8))
    assert [r.path for r in a.train_anomalies] == [r.path for r in b.train_anomalies]
    assert {r.path for r in a.train_anomalies} != {r.path for r in c.train_anomalies}


def test_hard_setting_tests_only_unseen_classes(mvtec_dir):
    ds = load_folder(mvtec_dir)
    sp = make_split(ds, Protocol("hard", 2, seed=0, known_class="hole"))
    assert {r.defect_type for r in sp.train_anomalies} == {"hole"}
    assert {r.defect_type for r in sp.test if r.label == 1} == {"scratch"}
    assert sp.seen_types == ["hole"]


def test_anomaly_free_setting(mvtec_dir):
    sp = make_split(load_folder(mvtec_dir), Protocol("general", 0))
    assert sp.train_anomalies == [] and sum(r.label == 1 for r in sp.test) == 12


@pytest.mark.parametrize("proto,msg", [
    (Protocol("general", 50), "fewer than the 50"),
    (Protocol("hard", 1, known_class="dent"), "unknown class 'dent'"),
    (Protocol("hard", 7, known_class="hole"), "class hole has 6 images"),
    (Protocol("sideways", 1), "unknown setting"),
])
def test_impossible_requests_are_clear(mvtec_dir, proto, msg):
    with pytest.raises(DataError, match=msg):
        make_split(load_folder(mvtec_dir), proto)


def test_no_normal_training_images(mvtec_dir):
    import shutil

    shutil.rmtree(mvtec_dir / "train")
    with pytest.raises(DataError, match="no normal training images"):
        make_split(load_folder(mvtec_dir), Protocol("general", 1))
