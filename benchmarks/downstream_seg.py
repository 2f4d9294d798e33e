"""Downstream part segmentation: the paper's test of a filter. A segmenter trained on the images a filter
keeps should segment clean images better than one trained on everything.

    python benchmarks/downstream_seg.py --seeds 0 1 2 [--quick] [--pretrained MIT_FOLDER] [--models A B]

For each seed s:
1. generate a TRAINING batch (generation seed 20_000 + s, half the images with an injected failure of any
   type, as in filter_quality) and a clean HELD-OUT batch (seed 30_000 + s, no failures). Seeds are
   disjoint from filter_quality's 10_000 + S and from PRF / KCF training data (keep those below 10_000);
2. run PRF (``prf.score.score``, both models intersected, the paper's rule) and KCF (``kcf.run.run_kcf``)
   on the training batch; the oracle keeps the faithful images, "unfiltered" keeps all;
3. train one SegFormer per filter (benchmarks.seg_model) on the kept images with the SAME number of
   iterations, batch size, initial weights (seeded by s) and sampling seed, labels = the batch's part
   masks mapped to coarse parts (for a failed image the mask is the INTENDED one, hence a bad sample);
4. evaluate per-part IoU and mIoU (background, head, torso, leg, tail; percent) on the held-out batch.
Over seeds: mean and 95 % t interval of each filter's mIoU / IoUs and of the paired differences (PRF -
unfiltered, PRF - KCF, oracle - PRF; paired because each seed shares data and initial weights).

Writes downstream_seg.json and downstream_seg.md to benchmarks/results (--quick: tiny batches and a few
iterations, to a temporary folder; untrained PRF stand-ins when the default checkpoints are missing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks import common, seg_model  # noqa: E402
from benchmarks.filter_quality import (  # noqa: E402
    QUICK_KCF,
    RESULTS,
    FilterSetup,
    add_filter_arguments,
    filter_setup_from_args,
    generate_batch,
    run_kcf_filter,
    run_prf,
)

TRAIN_OFFSET = 20_000
EVAL_OFFSET = 30_000
FILTERS = ("unfiltered", "kcf", "prf", "oracle")
DIFFERENCES = (("prf", "unfiltered", 3.0), ("prf", "kcf", 2.0), ("oracle", "prf", None))
ORACLE_GAP = 3.0


@dataclass
class SegSettings:
    """Sizes of one run: images per training / held-out batch, image side (px), iterations, batch size,
    learning rate, failure rate of the training batch."""

    n_train: int = 800
    n_eval: int = 200
    image_size: int = 96
    iterations: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    inject: float = 0.5


QUICK = SegSettings(n_train=24, n_eval=8, image_size=64, iterations=6, batch_size=8)


def verdicts(
    labels: pd.DataFrame, prf: pd.DataFrame | None, kcf: pd.DataFrame | None
) -> dict[str, np.ndarray]:
    """Filter -> (N,) bool keep mask over ``labels`` rows (SCORES given as DataFrames; None = skip)."""
    keep = {"unfiltered": np.ones(len(labels), dtype=bool)}
    if kcf is not None:
        keep["kcf"] = common.aligned(labels, common.keep_verdicts(kcf, ("kcf_keep",)), "kcf").astype(bool)
    if prf is not None:
        models = tuple(c for c in prf.columns if c.endswith("_keep") and c != "keep")
        keep["prf"] = common.aligned(labels, common.keep_verdicts(prf, models), "prf").astype(bool)
    keep["oracle"] = labels["injected_failure"].to_numpy() == common.FAITHFUL
    return keep


def run_seed(
    seed: int, settings: SegSettings, setup: FilterSetup, work: Path, pretrained: Path | None
) -> dict[str, Any]:
    """One seed: batches, filters, one segmenter per filter; returns per-filter results and timings."""
    train_batch, eval_batch = work / "train", work / "eval"
    size = settings.image_size
    gen_s = generate_batch(train_batch, TRAIN_OFFSET + seed, settings.n_train, size, settings.inject)
    gen_s += generate_batch(eval_batch, EVAL_OFFSET + seed, settings.n_eval, size, inject=0.0)
    labels = common.load_labels(train_batch)
    prf, prf_s, prf_info = run_prf(train_batch, work / "prf_scores.parquet", setup, work)
    kcf, kcf_s, _ = run_kcf_filter(train_batch, work / "kcf_scores.parquet", setup)
    keep = verdicts(labels, prf, kcf)
    train = seg_model.load_seg_data(train_batch, labels["image_id"].tolist())
    held_out = seg_model.load_seg_data(eval_batch)
    failed = labels["injected_failure"].to_numpy() != common.FAITHFUL
    results = {}
    for name, mask in keep.items():
        model = seg_model.build_segformer(pretrained, seed=seed)
        note, seconds, loss = "", 0.0, float("nan")
        if mask.any():
            log = seg_model.train_segmenter(
                model, train.subset(mask), settings.iterations, settings.batch_size, settings.lr, seed=seed
            )
            seconds, loss = log.seconds, float(np.mean(log.losses[-10:]))
        else:
            note = "kept no image: the segmenter stays untrained"
            print(f"WARNING: seed {seed}, filter {name}: {note}")
        scores = seg_model.evaluate_segmenter(model, held_out)
        results[name] = {
            **scores, "kept": int(mask.sum()), "kept_failures": int((mask & failed).sum()),
            "train_seconds": seconds, "final_loss": loss, "note": note,
        }  # fmt: skip
        print(f"seed {seed} {name:>10}: kept {int(mask.sum())}/{len(mask)}, mIoU {scores['miou']:.2f}")
    return {
        "seed": seed, "train_seed": TRAIN_OFFSET + seed, "eval_seed": EVAL_OFFSET + seed,
        "train_failures": int(failed.sum()), "generation_seconds": gen_s, "prf_seconds": prf_s,
        "kcf_seconds": kcf_s, "prf_checkpoints": prf_info["checkpoints"], "filters": results,
    }  # fmt: skip


def _run_key(settings: SegSettings, setup: FilterSetup, pretrained: Path | None) -> dict[str, Any]:
    """What a seed's result depends on besides the seed: settings, filter setup, the bytes of the
    thresholds file and of the checkpoints (the default ones when ``setup.models`` is None), and the
    machine (``platform.platform()``): a seed trained on another machine moved by up to a point of mIoU
    with identical data (benchmarks/README.md), so a mean never mixes machines."""
    import platform

    from prf.checkpoint import sha256_file

    models = setup.models or sorted((ROOT / "checkpoints").glob("prf_model_*.pt"))
    files = [setup.thresholds, *models, *(p for p in (setup.kcf_config, setup.kcf_thresholds) if p)]
    key = {
        "settings": asdict(settings),
        "setup": asdict(setup),
        "pretrained": str(pretrained) if pretrained else None,
        "sha256": {str(f): sha256_file(f) for f in files if Path(f).is_file()},
        "platform": platform.platform(),
    }
    return json.loads(json.dumps(key, default=str))


def seed_result(
    seed: int, settings: SegSettings, setup: FilterSetup, work: Path, pretrained: Path | None
) -> dict[str, Any]:
    """``run_seed``, or the result a previous run saved in ``work/result.json`` with the same ``_run_key``
    (so an interrupted multi-seed run redoes only the seeds it had not finished)."""
    saved, key = work / "result.json", _run_key(settings, setup, pretrained)
    if saved.is_file():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        if previous.get("key") == key:
            print(f"seed {seed}: reusing the finished result in {saved}")
            return previous["result"]
    result = run_seed(seed, settings, setup, work, pretrained)
    work.mkdir(parents=True, exist_ok=True)
    common.write_json(saved, {"key": key, "result": result})  # NaN (an untrained arm's loss) -> null
    return result


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95 % t interval over seeds of each filter's mIoU and per-part IoU, the paired differences,
    and the issue's targets (on the means)."""
    names = [n for n in FILTERS if all(n in s["filters"] for s in per_seed)]
    summary: dict[str, Any] = {}
    for name in names:
        runs = [s["filters"][name] for s in per_seed]
        entry = {
            key: common.mean_interval([r[key] for r in runs]).as_dict() for key in ("miou", "miou_parts")
        }
        parts = {}
        for part in seg_model.COARSE_PARTS:
            values = [r["iou"][part] for r in runs]
            parts[part] = common.mean_interval(values).as_dict() if np.isfinite(values).all() else None
        entry["iou"] = parts
        entry["kept_mean"] = float(np.mean([r["kept"] for r in runs]))
        entry["kept_failures_mean"] = float(np.mean([r["kept_failures"] for r in runs]))
        summary[name] = entry
    differences, targets = {}, []
    for a, b, goal in DIFFERENCES:
        if a in names and b in names:
            values = [s["filters"][a]["miou"] - s["filters"][b]["miou"] for s in per_seed]
            interval = common.mean_interval(values)
            differences[f"{a} - {b}"] = interval.as_dict()
            if goal is not None:
                targets.append({"check": f"mIoU {a} - {b} >= {goal:g}", "value": interval.mean, "goal": goal,
                                "pass": interval.mean >= goal})  # fmt: skip
            else:
                targets.append({"check": f"mIoU {a} - {b} <= {ORACLE_GAP:g}", "value": interval.mean,
                                "goal": ORACLE_GAP, "pass": interval.mean <= ORACLE_GAP})  # fmt: skip
    return {"filters": summary, "differences": differences, "targets": targets}


def run_downstream_seg(
    seeds: list[int],
    quick: bool = False,
    out_dir: str | Path | None = None,
    *,
    setup: FilterSetup | None = None,
    settings: SegSettings | None = None,
    pretrained: str | Path | None = None,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark (module docstring) over ``seeds``; write downstream_seg.json / .md to ``out_dir``
    (default benchmarks/results, or a new temporary folder with ``quick``). ``work_dir`` keeps every
    seed's batches, SCORES and KCF folds (resumable); by default a temporary folder, removed at the end."""
    if not seeds:
        raise ValueError("give at least one seed (--seeds 0 1 2)")
    settings = settings or (QUICK if quick else SegSettings())
    setup = setup or FilterSetup()
    if quick:
        overrides = {**QUICK_KCF, **setup.kcf_overrides}
        setup = replace(setup, untrained_ok=True, kcf_overrides=overrides)
    out = Path(out_dir) if out_dir else (Path(tempfile.mkdtemp(prefix="seg-quick-")) if quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="seg-work-"))
    started = time.perf_counter()
    try:
        per_seed = [
            seed_result(seed, settings, setup, work / f"seed{seed}", Path(pretrained) if pretrained else None)
            for seed in seeds
        ]
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "downstream_seg", "seeds": list(seeds), "quick": quick, "settings": asdict(settings),
        "model": str(pretrained) if pretrained else "tiny SegFormer, random init (seg_model.tiny_config)",
        **aggregate(per_seed), "per_seed": per_seed, "machine": common.machine(),
        "wall_seconds": time.perf_counter() - started,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    common.write_json(out / "downstream_seg.json", result)
    (out / "downstream_seg.md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {out / 'downstream_seg.json'} and {out / 'downstream_seg.md'}")
    return result


def _cell(interval: dict[str, Any] | None) -> str:
    if interval is None:
        return "-"
    return common.Interval(**interval).text(2)


def markdown(result: dict[str, Any]) -> str:
    """The report: mIoU and IoUs per filter (mean [95 % interval] over seeds), differences, targets."""
    s, m = result["settings"], result["machine"]
    first = result["per_seed"][0]
    quick = ", QUICK smoke run" if result["quick"] else ""
    lines = [
        f"# Downstream part segmentation (seeds {result['seeds']}{quick})\n",
        f"Training batches: {s['n_train']} images at {s['image_size']} px, {s['inject']:.0%} with injected "
        f"failures (seed 20000 + s); held-out: {s['n_eval']} clean images (seed 30000 + s). Segmenter: "
        f"{result['model']}, {s['iterations']} iterations of {s['batch_size']} for every filter. PRF "
        f"checkpoints: {first['prf_checkpoints']}. Machine: {m['platform']}, {m['cpu_count']} CPUs, GPU "
        f"{m['gpu']}. Values in percent: mean [95 % t interval] over seeds.\n",
    ]
    parts = list(seg_model.COARSE_PARTS)
    rows = []
    for name, entry in result["filters"].items():
        row = {"filter": name, "kept": f"{entry['kept_mean']:.0f} ({entry['kept_failures_mean']:.0f} failed)"}
        row.update(miou=_cell(entry["miou"]), miou_parts=_cell(entry["miou_parts"]))
        row.update({p: _cell(entry["iou"][p]) for p in parts})
        rows.append(row)
    cols = [("filter", "filter"), ("kept", "kept images"), ("miou", "mIoU"), ("miou_parts", "mIoU parts")]
    lines.append(common.markdown_table(rows, cols + [(p, p) for p in parts]))
    if result["differences"]:
        lines.append("\n## Paired mIoU differences (same data and initial weights per seed)\n")
        rows = [{"pair": k, "value": _cell(v)} for k, v in result["differences"].items()]
        lines.append(common.markdown_table(rows, [("pair", "difference"), ("value", "mIoU points")]))
    if result["targets"]:
        lines.append("\n## The issue's targets (on the mean over seeds)\n")
        rows = [{**t, "pass": "yes" if t["pass"] else "NO"} for t in result["targets"]]
        lines.append(
            common.markdown_table(rows, [("check", "check"), ("value", "value"), ("pass", "met")], 2)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds s (one run each)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, written to a temporary folder")
    parser.add_argument("--pretrained", type=Path, help="local MiT / SegFormer folder (never downloaded)")
    add_filter_arguments(parser)
    parser.add_argument("--n-train", type=int, help="training images per seed (full 800)")
    parser.add_argument("--n-eval", type=int, help="held-out images per seed (full 200)")
    parser.add_argument("--size", type=int, help="image side in pixels (full 96)")
    parser.add_argument("--iterations", type=int, help="segmenter training iterations (full 3000)")
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results; quick: a tmp dir)"
    )
    parser.add_argument("--work", type=Path, help="keep batches, SCORES and KCF folds here (resumable)")
    args = parser.parse_args(argv)
    setup = filter_setup_from_args(args)
    base = QUICK if args.quick else SegSettings()
    settings = SegSettings(
        n_train=args.n_train or base.n_train, n_eval=args.n_eval or base.n_eval,
        image_size=args.size or base.image_size, iterations=args.iterations or base.iterations,
        batch_size=base.batch_size, lr=base.lr, inject=base.inject,
    )  # fmt: skip
    result = run_downstream_seg(
        args.seeds, args.quick, args.out, setup=setup, settings=settings, pretrained=args.pretrained,
        work_dir=args.work,
    )  # fmt: skip
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
