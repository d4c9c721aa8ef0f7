"""The operating point: a threshold from held-out normals at a promised false-reject rate."""
import numpy as np
import pytest

from osad_core.operating_point import OperatingPoint, conformal_threshold, split_calibration


def test_conformal_rank_and_promise():
    scores = np.arange(1, 100, dtype=float)[::-1]  # 99 normals scoring 1..99, unsorted
    op = conformal_threshold(scores, 0.01)
    # k = ceil(100 * 0.99) = 99: just above the largest score; promise (100 - 99) / 100 = 1 %
    assert (op.rank, op.n_calibration) == (99, 99)
    assert op.frr == pytest.approx(0.01) and not op.limited
    assert 99 < op.threshold < 99.0001 and not (scores >= op.threshold).any()
    op5 = conformal_threshold(scores, 0.05)  # k = 95: the 4 largest are flagged
    assert op5.rank == 95 and op5.frr == pytest.approx(0.05)
    assert int((scores >= op5.threshold).sum()) == 4


def test_too_few_normals_says_so_and_uses_the_smallest_promisable_rate():
    op = conformal_threshold(np.linspace(0, 1, 15), 0.01)
    assert op.limited and op.rank == 15 and op.frr == pytest.approx(1 / 16)
    text = op.sentence(25)
    assert "cannot promise 1 %" in text and "1/16" in text
    assert conformal_threshold([], 0.01).threshold is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal_threshold([1.0], 0.0)


def test_promise_holds_on_new_normals_and_the_count_interval_covers():
    """Draw calibration and new normals from one distribution many times: the mean realised
    false-reject rate is at most the promise, and the Beta-binomial 95 % count interval holds
    the realised count about 95 % of the time."""
    rng = np.random.default_rng(0)
    n_cal, n_new, trials = 226, 377, 2000
    rates, inside = [], 0
    for _ in range(trials):
        op = conformal_threshold(rng.gamma(2.0, size=n_cal), 0.01)
        rejected = int((rng.gamma(2.0, size=n_new) >= op.threshold).sum())
        rates.append(rejected / n_new)
        _, lo, hi = op.false_rejects(n_new)
        inside += lo <= rejected <= hi
    assert op.frr == pytest.approx(2 / 227)
    assert np.mean(rates) == pytest.approx(op.frr, abs=0.0015)
    assert 0.93 <= inside / trials <= 0.995
    exp, lo, hi = op.false_rejects(n_new)
    assert exp == pytest.approx(377 * 2 / 227) and lo == 0 and 8 <= hi <= 12


def test_round_trip_through_a_dict():
    op = conformal_threshold(np.arange(50.0), 0.05)
    assert OperatingPoint.from_dict(op.to_dict()) == op
    assert OperatingPoint.from_dict(None) is None


def test_calibration_split_is_seeded_disjoint_and_leaves_enough_to_fit():
    from osad_core.data import ImageRecord

    recs = [ImageRecord(f"/x/{i:03d}.png", 0) for i in range(100)]
    fit, cal = split_calibration(recs[::-1], 0.2, seed=3)
    assert len(cal) == 20 and len(fit) == 80
    assert not {r.path for r in fit} & {r.path for r in cal}
    assert [r.path for r in split_calibration(recs, 0.2, seed=3)[1]] == [r.path for r in cal]
    assert split_calibration(recs[:10], 0.5, seed=0)[1].__len__() == 2  # 8 stay for fitting
    assert split_calibration(recs, 0.0, seed=0)[1] == []


TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64, "epochs": 1, "steps_per_epoch": 2}


def test_run_sets_and_stores_the_operating_point_from_held_out_normals(mvtec_dir, tmp_path):
    from db import session_scope
    from db import queries as q
    from osad_core.data import load_folder
    from osad_core.experiment import run_experiment
    from osad_core.methods import load_detector
    from osad_core.protocol import Protocol
    from osad_core.store import record_run

    ds = load_folder(mvtec_dir, name="parts")
    res = run_experiment(ds, Protocol("general", 2, seed=0), "dra", "tiny", TINY, with_tsne=False,
                         calibration_fraction=0.25, target_frr=0.1)
    cal = res.calibration_prediction
    assert len(cal.records) == 3 and len(res.split.train_normal) == 9  # 12 training normals
    assert not {r.path for r in cal.records} & {r.path for r in res.split.train_normal}
    op = res.operating_point
    assert op.limited and op.frr == pytest.approx(0.25)  # 3 normals: at best 1/4
    assert res.threshold == op.threshold > cal.scores.max()
    assert res.best_f1_threshold == res.metrics["best_f1_threshold"]
    normal = np.array([r.label == 0 for r in res.prediction.records])
    assert res.metrics["operating_point_frr_test"] == pytest.approx(
        np.mean(res.prediction.scores[normal] >= op.threshold))

    path = res.detector.save(tmp_path / "m.pt")
    assert load_detector(path).config["operating_point"]["threshold"] == op.threshold
    run_id = record_run(res, ds, model_path=path)
    with session_scope() as s:
        run = q.get_run(s, run_id)
        assert run.threshold == op.threshold
        assert run.config_json["operating_point"]["n_calibration"] == 3
        rows = q.run_scores(s, run_id)
    cal_rows = sorted(r["score"] for r in rows if r["role"] == "calibration")
    np.testing.assert_allclose(cal_rows, np.sort(cal.scores), rtol=1e-6)
    assert sum(r["role"] == "train_normal" for r in rows) == 9


def test_drift_warns_on_a_shifted_line_and_not_on_the_same_one():
    from osad_core.drift import compare, psi

    rng = np.random.default_rng(1)
    ref = rng.normal(0, 1, 226)
    same = compare(ref, rng.normal(0, 1, 300))
    assert not same.drifted and same.psi < 0.1 and "No drift" in same.sentence()
    moved = compare(ref, rng.normal(0.8, 1, 300))
    assert moved.drifted and moved.psi > 0.25 and moved.sentence().startswith("Drift warning")
    assert compare(ref, ref[:5]) is None  # too few new scores
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-9)


def test_redraw_check_tells_bad_luck_from_unlike_normals():
    from osad_core.operating_point import redraw_check

    rng = np.random.default_rng(1)
    same = redraw_check(rng.normal(size=226), rng.normal(size=377), draws=4000)
    # exchangeable sets: redraws reject about the promised 377 * 2/227 = 3.3 on average
    assert same["mean_rejects"] == pytest.approx(377 * 2 / 227, abs=0.3)
    assert same["p_at_least"] > 0.01 and same["interval"][0] <= same["measured_rejects"] <= same["interval"][1]
    shifted = redraw_check(rng.normal(size=226), rng.normal(0.5, 1.0, size=377), draws=4000)
    # test normals scoring higher: many more rejected than any redraw of the pooled normals gives
    assert shifted["measured_rejects"] > shifted["interval"][1] and shifted["p_at_least"] < 0.01
