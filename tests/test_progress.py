"""One stage-aware progress model: every method's training stages and a run's later stages."""
import math

import pytest

from osad_core.data import load_folder
from osad_core.methods.base import make_detector
from osad_core.progress import Progress, Tracker, clock, finite_metrics, progress_text
from osad_core.protocol import Protocol, make_split
from osad_core.train import Callbacks

R18 = {"weights": "random", "backbone": "resnet18", "image_size": 64}
# tiny preset plus the fewest steps that still run every stage
TINY = {
    "dra": dict(R18, epochs=2, steps_per_epoch=2),
    "devnet": dict(R18, epochs=2, steps_per_epoch=2),
    "saliencycut": dict(R18, epochs=2, steps_per_epoch=2),
    "bgad": dict(R18, epochs=2, steps_per_epoch=2),
    "ckaad": {"backbone": "efficientnet_lite0", "image_size": 64, "epochs": 2, "steps_per_epoch": 2},
    "fusion": {"backbone": "efficientnet_lite0", "device": "cpu", "head_steps": 5},
}
STAGES = {
    "dra": ["Training"], "devnet": ["Training"], "saliencycut": ["Training"],
    "bgad": ["Normal features", "Training", "Score scale"], "ckaad": ["Training"],
    "fusion": ["Normal features", "Memory coreset", "Anomaly head", "Reconstruction model"],
}


def test_tracker_counts_steps_per_stage_weights_the_fraction_and_drops_non_finite_metrics():
    t = Tracker([("Features", 1.0), ("Head", 3.0)])
    t.begin("Features", 10)
    p = t.advance(5, metrics={"loss": float("nan"), "acc": float("inf"), "lr": 0.01, "note": "x"})
    assert (p.stage, p.stage_index, p.stage_count, p.step, p.total) == ("Features", 1, 2, 5, 10)
    assert p.metrics == {"lr": 0.01} and p.fraction == pytest.approx(0.125) and p.eta_s is not None
    t.begin("Head", 4)
    p = t.advance(4, metrics={"loss": 0.5})
    assert p.fraction == 1.0 and p.loss == 0.5 and p.eta_s == 0.0
    t.begin("Unplanned", 0)  # a stage nobody planned still reports, at the end
    p = t.snapshot()
    assert (p.stage_index, p.stage_count, p.total, p.eta_s) == (3, 3, 0, None)


def test_progress_text_never_says_nan_or_none():
    p = Progress("Feature cache", 2, 3, 40, 120, 80.0, 10.0, 35.0, 0.5, {"loss": float("nan")})
    assert p.metrics == {} and p.text() == "Stage 2/3 · Feature cache · 40/120 · ETA 0:35"
    d = Progress("Training", 1, 4, 25, 100, 75.0, 70.0, 300.0, 0.25, {"loss": 0.4321}, epoch=2, epochs=10).to_dict()
    assert progress_text(d) == "Stage 1/4 · Training · 25/100 · epoch 3/10 · loss 0.4321 · ETA 5:00"
    # stored rows from elsewhere: a raw nan metric, a missing ETA, nothing at all
    assert progress_text({"stage": "t-SNE map", "stage_index": 5, "stage_count": 6, "step": 0, "total": 1,
                          "metrics": {"loss": math.nan}, "eta_s": None}) == "Stage 5/6 · t-SNE map · 0/1"
    assert progress_text({}) == "starting…" and progress_text({"message": "re-queued"}) == "re-queued"
    assert finite_metrics({"a": "1.5", "b": None}) == {"a": 1.5}
    assert clock(35) == "0:35" and clock(3725) == "1:02:05" and clock(float("nan")) == "?"


@pytest.mark.parametrize("method", list(TINY))
def test_every_method_reports_its_planned_stages_with_own_step_counters(method, mvtec_dir):
    sp = make_split(load_folder(mvtec_dir), Protocol("general", 2, seed=0))
    seen: list[Progress] = []
    det = make_detector(method, "tiny", TINY[method])
    det.fit(sp.train_normal, sp.train_anomalies, Callbacks(on_progress=seen.append, every_s=0))
    names = [n for n, _ in det.training_stages()]
    assert names == STAGES[method]
    assert list(dict.fromkeys(p.stage for p in seen)) == names  # each planned stage reported, in order
    for p in seen:
        assert p.stage_count == len(names) and p.stage_index == names.index(p.stage) + 1
        assert 0 <= p.step <= p.total or p.total == 0
        assert all(math.isfinite(v) for v in p.metrics.values()) and "nan" not in p.text().lower()
    for name in names:  # every stage ran to its own end
        last = [p for p in seen if p.stage == name][-1]
        assert last.step == last.total
    assert [p.fraction for p in seen] == sorted(p.fraction for p in seen) and seen[-1].fraction == pytest.approx(1.0)
    loops = [p for p in seen if p.epochs]
    assert loops and all("loss" in p.metrics for p in loops if p.step)  # a training loop reports its loss


def test_a_run_plans_training_scoring_the_rest_and_the_map(mvtec_dir):
    from osad_core.experiment import run_experiment

    seen: list[Progress] = []
    res = run_experiment(load_folder(mvtec_dir), Protocol("general", 2, seed=0), "dra", "tiny", TINY["dra"],
                         Callbacks(on_progress=seen.append, every_s=0))
    stages = list(dict.fromkeys((p.stage_index, p.stage) for p in seen))
    assert stages == [(1, "Training"), (2, "Scoring"), (3, "Scoring other images"), (4, "t-SNE map")]
    scoring = [p for p in seen if p.stage == "Scoring"]
    assert scoring[-1].step == scoring[-1].total == len(res.prediction.records) + len(
        res.calibration_prediction.records)
    rest = [p for p in seen if p.stage == "Scoring other images"][-1]
    assert rest.step == rest.total == len(res.split.train)
    assert res.tsne is not None and len(res.tsne) == len(res.tsne_records)
    tsne = [p for p in seen if p.stage == "t-SNE map"]  # the map counts its optimisation steps
    assert tsne[-1].step == tsne[-1].total == 750 and tsne[-1].fraction == 1.0
