"""Command line: ``python -m osad_core train|evaluate|score|import|export|benchmark|methods|worker``.

Every command that trains or evaluates records its run in the database (the app shows
it) unless ``--no-db`` is given. Bad input ends with one clear sentence and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .names import BACKBONES, DEFAULT_METHOD, METHOD_PRESETS, PRESETS, WEIGHT_CHOICES, WeightsUnavailable
from .data import DataError, ImageRecord, load_folder, resolve_dataset
from .protocol import Protocol

log = logging.getLogger("osad_core")

EPILOG = """examples:
  python -m osad_core train --data headct --method dra --shots 10 --out dra_headct.osad
  python -m osad_core train --data /data/bottle --method devnet --setting general --shots 1
  python -m osad_core train --data elpv --method dra --setting hard --known-class mono
  python -m osad_core evaluate --model dra_headct.osad --data headct --shots 10
  python -m osad_core score --model dra_headct.osad new_images/ --csv scores.csv
  python -m osad_core export --model dra_headct.osad --format onnx --out dra_headct.onnx
  python -m osad_core score --model dra_headct.onnx new_images/ --csv scores.csv   # onnxruntime only
  python -m osad_core export --model old_model.pt --out model.osad                 # an old .pt as a checked .osad
  python -m osad_core benchmark --data headct --methods devnet,dra --seeds 0 1 2 --json bench.json

--data takes `elpv` (the elpv-dataset package), `headct` (../shared/datasets/headct) or a
folder in MVTec layout: train/good, test/good, test/<defect type>[, ground_truth/<type>].
"""


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------
# argument groups
# --------------------------------------------------------------------------------------
def _add_protocol(p: argparse.ArgumentParser, seeds: bool = False) -> None:
    g = p.add_argument_group("protocol (how labelled anomalies are drawn; METHODS.md §7)")
    g.add_argument("--data", required=True, help="elpv, headct, or an MVTec-layout folder")
    g.add_argument("--setting", choices=("general", "hard"), default="general",
                   help="general: anomalies from any class; hard: from --known-class only, tested on the others")
    g.add_argument("--shots", type=int, default=10, help="labelled anomalies used for training (0 = anomaly-free)")
    g.add_argument("--known-class", help="the one anomaly class seen in training (hard setting)")
    if seeds:
        g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    else:
        g.add_argument("--seed", type=int, default=42, help="seeds the anomaly draw and training (default 42)")


def _add_model(p: argparse.ArgumentParser, multi: bool = False) -> None:
    g = p.add_argument_group("model")
    if multi:
        g.add_argument("--methods", default="devnet,dra", help="comma-separated methods (see `methods`)")
    else:
        g.add_argument("--method", default=DEFAULT_METHOD,
                       help=f"detector to train (default {DEFAULT_METHOD}; see `python -m osad_core methods`)")
    g.add_argument("--preset", choices=PRESETS + METHOD_PRESETS, default="quick",
                   help="quick: minutes on a CPU (smaller images, fewer steps); paper: the published settings; "
                        "tiny: seconds, for smoke tests; quick14: SaliencyCut only, quick at 224 px on a "
                        "stride-16 trunk (a 14×14 map for its patch residual)")
    g.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="auto = ImageNet ResNet-18 if its weights are present, else the offline ImageNet "
                        "EfficientNet-Lite0")
    g.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                   help="auto: best available (random only as a loud last resort); imagenet: fail without "
                        "pretrained weights; random: random initialisation")
    g.add_argument("--weights-path", help="explicit backbone weights file (.pth); also OSAD_BACKBONE_WEIGHTS")
    g.add_argument("--device", default=None, help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    g.add_argument("--image-size", type=int, help="override the preset's image size (pixels, square)")
    g.add_argument("--epochs", type=int, help="override the preset's epochs")
    g.add_argument("--steps-per-epoch", type=int, help="override the preset's iterations per epoch")
    g.add_argument("--batch-size", type=int, help="override the preset's batch size")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method setting, e.g. --set lr=1e-4 (repeatable)")


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-db", action="store_true", help="do not record the run in the OSAD Studio database")
    p.add_argument("--project", help="database project to record into (default: the dataset's name)")


def _add_ray(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help=f"{what}: HOST:6379 of `ray start --head`, `auto`, or `local` (a cluster in this process); "
                        "needs requirements-cluster.txt")


def _overrides(a) -> dict:
    o = {
        "backbone": a.backbone, "weights": a.weights, "weights_path": a.weights_path, "device": a.device,
        "image_size": a.image_size, "epochs": a.epochs, "steps_per_epoch": a.steps_per_epoch,
        "batch_size": a.batch_size,
    }
    for kv in a.set:
        if "=" not in kv:
            raise UserError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            o[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            o[k.strip()] = v
    return {k: v for k, v in o.items() if v is not None}


def _protocol(a, seed=None) -> Protocol:
    return Protocol(a.setting, a.shots, a.seed if seed is None else seed, a.known_class)


# --------------------------------------------------------------------------------------
# progress on the terminal
# --------------------------------------------------------------------------------------
def _terminal_callbacks(label: str = ""):
    from .progress import clock
    from .train import Callbacks

    tty = sys.stderr.isatty()

    def show(p):
        line = f"{label}{p.text()} · elapsed {clock(p.elapsed_s)}"
        if tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if p.fraction >= 1:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return Callbacks(on_progress=show, every_s=0.5 if tty else 15.0)


def _print_metrics(res) -> None:
    s = res.summary()
    print(f"method {s['method']} ({s['preset']} preset) on {s['device']}; backbone {s['backbone']} [{s['weights']}]")
    print(f"protocol: {res.split.protocol.describe()}; {res.split.summary()}")
    for k, v in res.metrics.items():
        print(f"  {k:20s} {v:.4f}")
    print(f"  train {s['train_seconds']:.1f}s, inference {s['images_per_s']:.1f} images/s")
    if res.skipped:
        print(f"  skipped {len(res.skipped)} unreadable image(s), e.g. {res.skipped[0][1]}")


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------
def cmd_methods(a) -> int:
    from .methods.base import REGISTRY, available_methods

    for name, desc in available_methods().items():
        cls = REGISTRY[name]
        print(f"{name:12s} {desc}")
        for preset, over in cls.presets.items():
            print(f"{'':12s}   preset {preset:6s} {json.dumps(over) if over else '(the published settings)'}")
    return 0


def _check_model_out(out: str | None) -> None:
    """Checked before any work: a model file is always one .osad file."""
    from .modelfile import EXTENSION

    if out is not None and Path(out).suffix != EXTENSION:
        raise UserError(f"--out must end in {EXTENSION} (OSAD Studio model file), got {Path(out).name!r}")


def cmd_train(a) -> int:
    from .experiment import run_experiment

    _check_model_out(a.out)
    ds = _dataset(a.data)
    proto = _protocol(a)
    res = run_experiment(ds, proto, a.method, a.preset, _overrides(a), _terminal_callbacks())
    _print_metrics(res)
    model_path = None
    if a.out:
        model_path = res.detector.save(a.out)  # atomic: a kill never leaves half a model under that name
        print(f"model saved to {model_path}")
    if not a.no_db:
        from .store import record_run

        run_id = record_run(res, ds, source="cli", project_name=a.project, model_path=model_path,
                            created_by=_cli_user())
        print(f"recorded as run {run_id} in the OSAD Studio database")
    if a.json:
        Path(a.json).write_text(json.dumps(res.summary(), indent=2))
    return 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate_prediction
    from .methods.base import load_detector
    from .protocol import make_split

    det = load_detector(a.model, a.device or "auto")
    ds = _dataset(a.data)
    split = make_split(ds, _protocol(a))
    t0 = time.monotonic()
    pred = det.predict(split.test)
    dt = time.monotonic() - t0
    m = evaluate_prediction(pred.records, pred.scores, pred.maps, split.seen_types)
    print(f"{det.describe()} on {det.device_name}")
    print(f"protocol: {split.protocol.describe()}; test {len(pred.records)} images")
    print("note: images labelled for training under this protocol are excluded; if the model was trained "
          "with another protocol or seed, its training anomalies may be in this test set")
    for k, v in m.items():
        print(f"  {k:20s} {v:.4f}")
    print(f"  inference {len(pred.records) / max(dt, 1e-9):.1f} images/s")
    if a.json:
        Path(a.json).write_text(json.dumps({"metrics": m, "model": str(a.model)}, indent=2))
    return 0


def _dataset(spec: str):
    ds = resolve_dataset(spec)
    for _, why in ds.skipped:  # names that are not UTF-8: left out, said once
        print(f"skipped: {why}", file=sys.stderr)
    return ds


def _collect_images(paths: list[str]) -> list[ImageRecord]:
    recs: list[ImageRecord] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            ds = load_folder(path)
            recs += ds.records
            for _, why in ds.skipped:
                print(f"skipped: {why}", file=sys.stderr)
        elif path.is_file():
            recs.append(ImageRecord(str(path), -1))
        else:
            raise DataError(f"`{path}` does not exist")
    if not recs:
        raise DataError("no images to score")
    return recs


def _threshold(a, operating_point: dict | None) -> float | None:
    """--threshold when given, else the model's operating point (set from held-out normals)."""
    if a.threshold is not None:
        return a.threshold
    op = (operating_point or {}).get("threshold")
    if op is not None:
        print(f"verdicts at the model's operating point {op:.4f} (promised false-reject rate "
              f"{100 * operating_point['frr']:.2g} % from {operating_point['n_calibration']} held-out normals)",
              file=sys.stderr)
    return op


def cmd_score(a) -> int:
    """Score files and folders in batches (:mod:`osad_core.bulk_score`): rows are written
    as each batch comes back and memory stays flat however many images there are."""
    from .bulk_score import load_model, score_paths
    from .executors import get_executor

    onnx = Path(a.model).suffix.lower() == ".onnx"
    if getattr(a, "ray", None) and onnx:
        raise UserError("`score --ray` takes an .osad model; score an .onnx file without --ray")
    model = load_model(a.model)
    operating_point = model.operating_point if onnx else model.config.get("operating_point")
    del model  # each batch uses the executor's own copy
    thr = _threshold(a, operating_point)
    paths = [r.path for r in _collect_images(a.images)]
    executor = get_executor(getattr(a, "ray", None))
    try:
        done = score_paths(executor, a.model, paths, a.csv, thr, a.device, a.batch)
    finally:
        executor.close()
    _drift(operating_point, done["scores"])
    return 0 if done["scored"] else 2


def _drift(operating_point: dict | None, scores) -> None:
    """Compare the scored images with the model's held-out normals (models trained before
    these were stored carry none)."""
    from .drift import MIN_SCORES, compare

    ref = (operating_point or {}).get("calibration_scores")
    if not ref:
        return
    d = compare(ref, scores)
    print(d.sentence() if d else f"drift: fewer than {MIN_SCORES} images scored, not compared", file=sys.stderr)


def cmd_export(a) -> int:
    from .export import NotExportable, export_onnx
    from .methods.base import load_detector

    fmt = a.format or ("onnx" if a.out.lower().endswith(".onnx") else "osad")
    if fmt == "osad":  # e.g. an old .pt model rewritten as a checked .osad file
        _check_model_out(a.out)
        det = load_detector(a.model, "cpu")
        print(f"{det.describe()} saved to {det.save(a.out)}")
        return 0
    det = load_detector(a.model, "cpu")  # the graph is traced on the CPU; onnxruntime picks its own device
    try:
        man = export_onnx(det, a.out)
    except NotExportable as exc:
        raise UserError(str(exc)) from None
    op = man.get("operating_point")
    print(f"wrote {a.out} and {a.out}.json (sha256 {man['onnx_sha256'][:12]}…); input {man['preprocess']['size']} px "
          f"RGB, ImageNet mean/std; operating point {op['threshold']:.4f}" if op else
          f"wrote {a.out} and {a.out}.json; the model has no operating point: pass --threshold when scoring")
    return 0


def benchmark_cell(ds, preset: str, over: dict, record: dict | None, cell: tuple) -> dict:
    """One (method, protocol) cell of a benchmark; ``record``: record_run's project and
    author, or None (--no-db). Runs wherever the executor puts it."""
    from .experiment import run_experiment

    method, proto = cell
    label = f"[{method} {proto.describe()}] "
    res = run_experiment(ds, proto, method, preset, over, _terminal_callbacks(label),
                         with_tsne=record is not None, score_train=record is not None)
    s = res.summary()
    s["config"] = res.detector.config  # the resolved settings: presets change, the record must not
    if record is not None:
        from .store import record_run

        record_run(res, ds, source="benchmark", project_name=record["project"], created_by=record["user"])
    # per-head AUROCs and the method's own training statistics (SaliencyCut's salient fraction,
    # Fusion's gate), one list per row
    own = res.detector.training_metrics()
    extras = {k: v for k, v in res.metrics.items() if k.startswith("head_") or k in own}
    return {"label": label, "summary": s, "auroc": res.metrics.get("image_auroc", float("nan")), "extras": extras,
            "base_auroc": res.metrics.get("base_image_auroc"),  # AHL: its own base model, same run
            "base": res.detector.config.get("base"), "train_s": res.train_seconds, "ips": res.images_per_s}


def cmd_benchmark(a) -> int:
    from .executors import get_executor

    ds = _dataset(a.data)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    from .methods import make_detector

    for m in methods:  # an unknown method, preset or setting fails now, not after hours of other cells
        make_detector(m, a.preset, _overrides(a))
    classes = [a.known_class] if a.known_class else [None]
    if a.setting == "hard" and not a.known_class:
        classes = ds.defect_types  # mean over known classes, as the papers report
    over = _overrides(a)
    record = None if a.no_db else {"project": a.project, "user": _cli_user()}
    groups = [(method, kc) for method in methods for kc in classes]
    cells = [(method, Protocol(a.setting, a.shots, seed, kc)) for method, kc in groups for seed in a.seeds]
    executor = get_executor(getattr(a, "ray", None))  # local: one cell after the other, in this process
    gpu = str(over.get("device") or "").startswith("cuda")
    if executor.name == "ray" and not over.get("device"):
        from .executors.ray import cluster_has_gpu

        gpu = cluster_has_gpu()
    results = executor.map(benchmark_cell, cells, gpu=gpu, shared=(ds, a.preset, over, record))
    rows, runs = [], []
    try:
        for method, kc in groups:
            aucs, base_aucs, times, ips, extras = [], [], [], [], {}
            for _seed in a.seeds:
                c = next(results)
                s = c["summary"]
                runs.append(s)
                aucs.append(c["auroc"])
                if c["base_auroc"] is not None:
                    base_aucs.append(c["base_auroc"])
                times.append(c["train_s"])
                ips.append(c["ips"])
                for k, v in c.get("extras", {}).items():
                    extras.setdefault(k, []).append(v)
                base = f" (base model {base_aucs[-1]:.4f})" if base_aucs else ""
                more = "".join(f"  {k} {v:.4f}" for k, v in c.get("extras", {}).items())
                print(f"{c['label']}AUROC {aucs[-1]:.4f}{base}  train {times[-1]:.0f}s  {ips[-1]:.1f} img/s{more}",
                      flush=True)
            rows.append({
                "method": method, "data": ds.name, "setting": a.setting, "shots": a.shots, "known_class": kc,
                "preset": a.preset, "auroc_mean": float(np.mean(aucs)), "auroc_std": float(np.std(aucs)),
                "aurocs": aucs, "train_s_mean": float(np.mean(times)), "images_per_s": float(np.mean(ips)),
                "seeds": a.seeds, "backbone": s["backbone"], "weights": s["weights"], "device": s["device"],
                "overrides": over,
                # lists per seed, only where every seed has the value
                **{f"{k}s": v for k, v in extras.items() if len(v) == len(aucs)},
            })
            if base_aucs:
                rows[-1].update(base=c["base"], base_aurocs=base_aucs, base_auroc_mean=float(np.mean(base_aucs)),
                                base_auroc_std=float(np.std(base_aucs)))
    finally:
        executor.close()
    print()
    print(f"{'method':10s} {'data':8s} {'setting':8s} {'shots':>5s} {'known':6s} {'AUROC mean ± std':18s} "
          f"{'train s':>8s} {'img/s':>6s}")
    for r in rows:
        print(f"{r['method']:10s} {r['data']:8s} {r['setting']:8s} {r['shots']:5d} {str(r['known_class'] or '-'):6s} "
              f"{r['auroc_mean']:.3f} ± {r['auroc_std']:.3f}      {r['train_s_mean']:8.0f} {r['images_per_s']:6.1f}")
        if "base_auroc_mean" in r:
            print(f"{'  its base':10s} {'':8s} {'':8s} {'':5s} {'':6s} {r['base_auroc_mean']:.3f} ± "
                  f"{r['base_auroc_std']:.3f}      (the same runs' stage-A {r.get('base') or 'base'} model)")
    print(f"(seeds {a.seeds}; std is the population std over seeds; backbone {rows[-1]['backbone']} "
          f"[{rows[-1]['weights']}]; device {rows[-1]['device']})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"rows": rows, "runs": runs}, indent=2, default=str))
        print(f"wrote {a.json}")
    return 0


def _cli_user() -> str:
    """Who ran a command: runs from the command line are recorded as ``cli:<OS user>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment (some containers)
        return "cli"


def _read_password(a) -> str:
    if a.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    if not sys.stdin.isatty():
        raise UserError("no terminal to ask for the password; pipe it in with --password-stdin")
    first = getpass.getpass(f"Password for {a.name}: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise UserError("the two passwords differ; nothing was changed")
    return first


def cmd_users(a) -> int:
    """Accounts of the app (the first admin is created here)."""
    from db import auth

    try:
        if a.users_command == "add":
            acc = auth.create_user(a.name, _read_password(a), a.role)
            print(f"added {acc.username} ({acc.role})")
        elif a.users_command == "list":
            rows = auth.list_accounts()
            if not rows:
                print("no accounts yet: login is off on this machine's loopback address only; "
                      "add the first admin with `python -m osad_core users add NAME --role admin`")
            for r in rows:
                state = "disabled" if r["disabled"] else "active"
                print(f"{r['username']:<24} {r['role']:<9} {state:<8} created {r['created_at']:%Y-%m-%d %H:%M} UTC")
        elif a.users_command == "set-role":
            auth.set_role(a.name, a.role)
            print(f"{a.name} is now {a.role}")
        elif a.users_command == "passwd":
            auth.set_password(a.name, _read_password(a))
            print(f"password of {a.name} changed")
        elif a.users_command in ("disable", "enable"):
            auth.set_disabled(a.name, a.users_command == "disable")
            print(f"{a.name} {a.users_command}d")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_import(a) -> int:
    """A folder into a project (created on first use), in batches with progress and ETA;
    run it again after an interruption and it continues where it stopped."""
    from db import init_db, session_scope
    from db import queries as q

    from .batch_progress import line_sink
    from .folder_import import import_dataset

    ds = load_folder(a.folder)
    for _, why in ds.skipped:
        print(f"skipped: {why}", file=sys.stderr)
    init_db()
    name = a.project or ds.name
    with session_scope() as s:
        proj = q.get_project_by_name(s, name)
        if proj is None:
            proj = q.create_project(s, name, "cli", root_path=ds.root,
                                    description=f"imported by the command line from {ds.root}")
        pid = proj.id
    res = import_dataset(pid, ds, author=_cli_user(), decode=not a.no_decode, batch=a.batch, sink=line_sink())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(f"project “{name}” (id {pid}): {res.sentence()}", file=sys.stderr)
    return 0 if res.added or res.already else 2


def cmd_worker(a) -> int:
    from .executors import get_executor, ray_address
    from .worker import run_job_process, run_worker

    if a.job is not None:
        return run_job_process(a.job, a.worker_id)
    executor = get_executor(ray_address(a.ray))
    try:
        return run_worker(once=a.once, idle_exit_s=a.idle_exit, executor=executor)
    finally:
        executor.close()


# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m osad_core",
        description="OSAD Studio: train and use open-set supervised anomaly detectors "
                    "(DevNet, DRA, …) on images: many normal images plus a few labelled anomalies.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("methods", help="list the detectors and their presets")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("train", help="train a detector under a protocol, evaluate it on the held-out test set",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_protocol(s)
    _add_model(s)
    s.add_argument("--out", help="save the trained model to this file (one .osad file: safetensors + manifest)")
    s.add_argument("--json", help="write the run summary (metrics, timings, weights) as JSON")
    _add_db(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="evaluate a saved model on a dataset's test split")
    s.add_argument("--model", required=True, help="model file (.osad) written by `train --out`")
    _add_protocol(s)
    s.add_argument("--device", default=None, help="auto, cpu, cuda or mps")
    s.add_argument("--json", help="write the metrics as JSON")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("score", help="score new images (files or folders) with a saved model")
    s.add_argument("--model", required=True, help="model file (.osad) written by `train --out`, or an exported .onnx")
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--csv", help="also write path,score[,verdict] to this CSV file")
    s.add_argument("--threshold", type=float,
                   help="verdict: anomaly when score >= threshold (default: the model's operating point)")
    s.add_argument("--device", default=None, help="auto, cpu, cuda or mps")
    _add_ray(s, "score batches of images as tasks on this Ray cluster")
    s.add_argument("--batch", type=int, default=256,
                   help="images per batch (a Ray task with --ray); rows are written after each batch")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("import", help="import a folder of images into a project of the app (resumable; "
                                      "for folders of any size)")
    s.add_argument("folder", help="an MVTec-layout folder (labels kept) or any folder of images (unlabelled)")
    s.add_argument("--project", help="project to import into, created when missing (default: the folder's name)")
    s.add_argument("--batch", type=int, default=500, help="files per database transaction")
    s.add_argument("--no-decode", action="store_true",
                   help="check each file's header only, not a full decode (faster; truncated files pass)")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("export", help="export a saved model: ONNX + manifest for scoring without PyTorch, "
                                      "or a checked .osad file (also from an old .pt one)")
    s.add_argument("--model", required=True, help="model file written by `train --out` (.osad, or an old .pt)")
    s.add_argument("--format", choices=("onnx", "osad"), default=None,
                   help="onnx or osad (default: from the --out file's extension)")
    s.add_argument("--out", required=True, help="the .onnx file (its manifest goes to OUT.json) or .osad file to write")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("benchmark", help="run methods over a protocol and several seeds; mean ± std table",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_protocol(s, seeds=True)
    _add_model(s, multi=True)
    s.add_argument("--json", help="write all rows and runs as JSON")
    _add_db(s)
    _add_ray(s, "run the (method, seed) cells as tasks on this Ray cluster")
    s.set_defaults(func=cmd_benchmark)

    from db.models import ROLES

    s = sub.add_parser("users", help="accounts of the app: add, list, set-role, passwd, disable, enable")
    us = s.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    u = us.add_parser("add", help="add an account (the password is asked for, or read from stdin)")
    u.add_argument("name")
    u.add_argument("--role", choices=ROLES, required=True,
                   help="admin: everything, users too; labeller: label, train, cancel, export; viewer: read only")
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    us.add_parser("list", help="list the accounts")
    u = us.add_parser("set-role", help="change an account's role")
    u.add_argument("name")
    u.add_argument("role", choices=ROLES)
    u = us.add_parser("passwd", help="set a new password")
    u.add_argument("name")
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    for action in ("disable", "enable"):
        u = us.add_parser(action, help=f"{action} an account (accounts are never deleted: history names them)")
        u.add_argument("name")
    s.set_defaults(func=cmd_users)

    s = sub.add_parser("worker", help="run training jobs queued by the app (normally started by the app)")
    s.add_argument("--once", action="store_true", help="run at most one job, then exit")
    s.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    s.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)  # the worker's job process
    s.add_argument("--worker-id", default="", help=argparse.SUPPRESS)
    _add_ray(s, "run the jobs as tasks on this Ray cluster (default: $OSAD_RAY_ADDRESS)")
    s.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    try:
        return a.func(a)
    except (UserError, DataError, WeightsUnavailable, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad settings (unknown method, preset, device, …)
        if a.verbose:
            raise  # with -v, show where a ValueError came from
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # only code that imported the training module can be cancelled; looking it up here
        # keeps torch out of commands that never need it (ONNX scoring)
        train = sys.modules.get("osad_core.train")
        if train is not None and isinstance(exc, train.TrainingCancelled):
            print("cancelled", file=sys.stderr)
            return 130
        raise
