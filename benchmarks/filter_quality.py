"""Filter quality: how well no filter, KCF, PRF (model A, model B, A and B intersected) and the oracle reject
images with known injected failures.

    python benchmarks/filter_quality.py --seed S [--quick] [--models A.pt B.pt] [--n N] [--size PX]

1. Generate a benchmark BATCH with the render backend: half the images carry an injected failure, of every
   type in generation.failures.FAILURE_TYPES. SEED SCHEME: the batch's generation seed is 10_000 + S
   (``SEED_OFFSET``); downstream_seg uses 20_000 + s (training) and 30_000 + s (held-out). Every image's
   seed is SeedSequence([batch seed, index]), so batches with different run seeds share no image; keep the
   seeds of PRF / KCF training data below 10_000 and the benchmark never sees a training image.
2. Score it with PRF (``prf.score.score``; thresholds.yaml and the default checkpoints unless given) and
   with KCF (``kcf.run.run_kcf``; unless given: the packaged CPU config with model A's backbone weights
   standing in for the ImageNet weights 3D-DST starts from (``KCF_BACKBONE``; ``--kcf-set
   model.pretrained_path=null`` trains from scratch), and the orientation verdict of
   kcf/configs/thresholds_geodesic.yaml, geodesic error <= 90 degrees).
3. Report (benchmarks.common) precision / recall / F1 of rejecting failures and the kept fraction for every
   filter, per failure type and overall, for all failures and for failures whose effect is at least
   ``--min-effect`` (default 0.15 sqrt(silhouette area): PCK@0.15's tolerance, below which the annotation
   still counts as right); AUROC of each continuous score; wall time and time per image; the issue's
   targets, checked. Writes filter_quality.json, filter_quality.md and PNG plots to benchmarks/results/
   (--quick: a 24-image 64 px batch and a 2-fold 1-epoch KCF, written to a temporary folder).

PRF "A only" / "B only" verdicts are the per-model ``<name>_keep`` columns of ONE scoring run, whose wall
time is shown for all three PRF rows. --quick without the default checkpoints scores with UNTRAINED tiny
stand-ins (a smoke test of the machinery; its numbers mean nothing, and the results say so).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import ALL, ARTICULATION, POOLED, FilterRun  # noqa: E402

SEED_OFFSET = 10_000
# KCF's defaults here. 3D-DST fine-tunes an ImageNet-initialised ResNet-50; none can be downloaded, and from
# random weights the CPU KCF barely learns the azimuth (docs/kcf.md), so model A's backbone (trained on
# faithful renders of seeds < 10_000) stands in. It helps the baseline: it already knows animal poses.
KCF_BACKBONE = ROOT / "checkpoints" / "prf_model_a.pt"
KCF_THRESHOLDS = ROOT / "kcf" / "configs" / "thresholds_geodesic.yaml"
RESULTS = ROOT / "benchmarks" / "results"
FULL_SETTINGS = {"n": 1200, "image_size": 128}
QUICK_SETTINGS = {"n": 24, "image_size": 64}
INJECT_FAILURES = 0.5
QUICK_KCF = {"folds": 2, "trainer.max_epochs": 1, "model.input_size": 64, "batch_size": 8}
DEFAULT_MIN_EFFECT = 0.15
PRF_METRICS = ("pa_mpjpe", "s_mpjpe", "pck", "max_kp_error", "max_rel_kp_error")
KCF_METRICS = ("kcf_ce", "kcf_geodesic")


# ---- running the filters (also used by downstream_seg) -------------------------------------------------
def generate_batch(out: Path, seed: int, n: int, image_size: int, inject: float = INJECT_FAILURES) -> float:
    """Generate (or resume) a render-backend BATCH with every failure type; returns wall seconds. Restores
    torch's thread count afterwards (generation sets it to 1 for its image threads)."""
    import torch

    from generation.failures import FAILURE_TYPES
    from generation.run import run_generate

    settings = {"n": n, "seed": seed, "image_size": image_size, "inject_failures": inject}
    if inject > 0:
        settings["failure_types"] = list(FAILURE_TYPES)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        run_generate(out, settings, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return time.perf_counter() - started


def save_untrained_checkpoint(path: Path, input_size: int, seed: int) -> Path:
    """An UNTRAINED tiny PARE regressor exported like ``prf train`` does (smoke tests only)."""
    from prf.checkpoint import save_untrained_export

    head = {"hidden": 32, "num_part_channels": 8, "feature_channels": 8, "pose_hidden": 8}
    return save_untrained_export(path, input_size, seed, head, f"untrained-stand-in-{seed}")


@dataclass
class FilterSetup:
    """How to run PRF and KCF: checkpoints (None = the thresholds file's / defaults), thresholds files,
    KCF config file and dotted overrides. ``untrained_ok``: use untrained stand-ins when the default
    checkpoints are missing (quick mode)."""

    models: list[Path] | None = None
    thresholds: Path = ROOT / "thresholds.yaml"
    kcf_config: Path | None = None
    kcf_overrides: dict[str, Any] = field(default_factory=dict)
    kcf_thresholds: Path | None = KCF_THRESHOLDS
    untrained_ok: bool = False


def prf_checkpoints(setup: FilterSetup, work: Path) -> tuple[list[Path] | None, str]:
    """The checkpoints to pass to prf.score (None = its own resolution) and a note on what they are."""
    from prf.score import resolve_checkpoints
    from prf.thresholds import load_thresholds

    thresholds = load_thresholds(setup.thresholds)
    try:
        chosen = resolve_checkpoints(thresholds, setup.models)
    except FileNotFoundError as err:
        if not setup.untrained_ok:
            raise FileNotFoundError(f"{err}. (--quick alone falls back to untrained stand-ins)") from None
        names = thresholds.config.model_names()
        paths = [save_untrained_checkpoint(work / f"untrained_{n}.pt", 64, k) for k, n in enumerate(names)]
        print(f"WARNING: {err}\n  -> scoring with UNTRAINED stand-ins: the PRF numbers are meaningless")
        return paths, "UNTRAINED stand-ins (smoke test only; numbers meaningless)"
    return setup.models, ", ".join(f"{n}: {p}" for n, p in chosen.items())


def run_prf(
    batch: Path, out: Path, setup: FilterSetup, work: Path
) -> tuple[pd.DataFrame, float | None, dict]:
    """Score ``batch`` with PRF into ``out``; returns (SCORES, wall seconds or None when the run resumed
    an earlier one, info)."""
    from prf.score import score

    models, note = prf_checkpoints(setup, work)
    started = time.perf_counter()
    summary = score(batch, setup.thresholds, models, out, device="cpu", quiet=True)
    seconds: float | None = time.perf_counter() - started
    if summary.skipped:
        seconds = None  # part of the batch was scored by an earlier run: the time would be misleading
    frame = common.read_scores(out)
    names = [c[: -len("_keep")] for c in frame.columns if c.endswith("_keep") and c != "keep"]
    info = {"checkpoints": note, "thresholds": str(setup.thresholds), "models": names,
            "scored_now": summary.scored_now, "resumed": summary.skipped}  # fmt: skip
    return frame, seconds, info


def run_kcf_filter(batch: Path, out: Path, setup: FilterSetup) -> tuple[pd.DataFrame, float, dict]:
    """Run KCF on ``batch`` into ``out``; returns (SCORES, seconds, info incl. its cost record). Seconds:
    the wall time, or the folds' recorded train + score time when some folds were resumed."""
    from kcf.run import load_config, run_kcf

    backbone = {"model.pretrained_path": str(KCF_BACKBONE)} if KCF_BACKBONE.is_file() else {}
    overrides = {"trainer.progress_bar": False, **backbone, **setup.kcf_overrides}
    config = load_config(setup.kcf_config, overrides)
    started = time.perf_counter()
    result = run_kcf(batch, out, config=config, thresholds=setup.kcf_thresholds)
    seconds = time.perf_counter() - started
    if result is None:
        raise RuntimeError(f"KCF on {batch} did not finish every fold")
    if result.resumed_folds:  # folds done by an earlier run: use their recorded train + score time
        seconds = result.train_seconds + result.score_seconds
    info = {"config": str(setup.kcf_config or "kcf/configs/kcf_default.yaml"), "overrides": overrides,
            "thresholds": result.metadata.get("kcf", {}).get("thresholds"),
            "cost": result.metadata.get("cost", {})}  # fmt: skip
    return result.scores, seconds, info


def build_runs(
    labels: pd.DataFrame,
    prf: pd.DataFrame | None,
    prf_seconds: float | None,
    kcf: pd.DataFrame | None,
    kcf_seconds: float | None,
) -> list[FilterRun]:
    """The compared filters from SCORES tables: none, kcf, prf_<model> each, prf_<A>&<B> (intersection of
    the per-model verdicts), oracle (the injected labels)."""
    ids = labels["image_id"].to_numpy()
    runs = [FilterRun("none", pd.Series(True, index=ids), seconds=0.0, note="keeps everything")]
    if kcf is not None:
        scores = {c: kcf.set_index("image_id")[c] for c in KCF_METRICS if c in kcf.columns}
        runs.append(FilterRun("kcf", common.keep_verdicts(kcf, ("kcf_keep",)), scores, kcf_seconds))
    if prf is not None:
        names = [c[: -len("_keep")] for c in prf.columns if c.endswith("_keep") and c != "keep"]
        indexed = prf.set_index("image_id")
        for name in names:
            # a metric the thresholds file does not compute (max_rel_kp_error without scales) is all NaN
            scores = {
                f"{name}_{m}": indexed[f"{name}_{m}"]
                for m in PRF_METRICS
                if f"{name}_{m}" in indexed and indexed[f"{name}_{m}"].notna().any()
            }
            keep = common.keep_verdicts(prf, (f"{name}_keep",))
            runs.append(FilterRun(f"prf_{name}", keep, scores, prf_seconds, "one run scores every model"))
        if len(names) > 1:
            keep = common.keep_verdicts(prf, tuple(f"{n}_keep" for n in names))
            runs.append(FilterRun("prf_" + "&".join(names), keep, {}, prf_seconds, "models intersected"))
    oracle = pd.Series(labels["injected_failure"].to_numpy() == common.FAITHFUL, index=ids)
    runs.append(FilterRun("oracle", oracle, seconds=0.0, note="the injected labels"))
    return runs


# ---- the benchmark -------------------------------------------------------------------------------------
def check_targets(quality: pd.DataFrame, runs: list[FilterRun]) -> list[dict[str, Any]]:
    """The issue's filter-quality targets on the effect-filtered rows: one dict per check (value, goal,
    pass). PRF = the intersection of every PRF model (the last prf_ run)."""
    prf = [r.name for r in runs if r.name.startswith("prf_")]
    if not prf or not any(r.name == "kcf" for r in runs):
        return []
    both = prf[-1]
    table = quality.set_index(["filter", "subset"])

    def f1(name: str, subset: str) -> float:
        return float(table.loc[(name, subset), "f1"]) if (name, subset) in table.index else float("nan")

    checks = []

    def add(check: str, value: float, goal: float) -> None:
        met = None if math.isnan(value) else bool(value >= goal)
        checks.append({"check": check, "value": value, "goal": goal, "pass": met})

    for kind in (*ARTICULATION, *POOLED):  # each articulation type, then all of them pooled
        add(f"{both} F1 on {kind} >= 0.85", f1(both, kind), 0.85)
        add(f"{both} F1 - kcf F1 on {kind} >= 0.3", f1(both, kind) - f1("kcf", kind), 0.3)
    for name in ("kcf", both):
        add(f"{name} F1 on orientation_flip >= 0.8", f1(name, "orientation_flip"), 0.8)
    seconds = {r.name: r.seconds for r in runs}
    if seconds.get("kcf") and seconds.get(both):
        add("kcf seconds / prf seconds (same batch) >= 100", seconds["kcf"] / seconds[both], 100.0)
    return checks


def run_filter_quality(
    seed: int,
    quick: bool = False,
    out_dir: str | Path | None = None,
    *,
    setup: FilterSetup | None = None,
    n: int | None = None,
    image_size: int | None = None,
    min_effect: float = DEFAULT_MIN_EFFECT,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark (module docstring) and write its outputs to ``out_dir`` (default
    benchmarks/results, or a new temporary folder with ``quick``). ``work_dir`` keeps the batch and the
    SCORES (resumable); by default they live in a temporary folder that is removed. Returns the JSON dict."""
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    n, image_size = n or settings["n"], image_size or settings["image_size"]
    setup = setup or FilterSetup()
    if quick:
        overrides = {**QUICK_KCF, **setup.kcf_overrides}
        setup = replace(setup, untrained_ok=True, kcf_overrides=overrides)
    out = Path(out_dir) if out_dir else (Path(tempfile.mkdtemp(prefix="fq-quick-")) if quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fq-work-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        batch = work / "batch"
        gen_seconds = generate_batch(batch, SEED_OFFSET + seed, n, image_size)
        labels = common.load_labels(batch)
        prf, prf_seconds, prf_info = run_prf(batch, work / "prf_scores.parquet", setup, work)
        kcf, kcf_seconds, kcf_info = run_kcf_filter(batch, work / "kcf_scores.parquet", setup)
        runs = build_runs(labels, prf, prf_seconds, kcf, kcf_seconds)
        result = summarise(labels, runs, min_effect)
        result.update(
            benchmark="filter_quality", seed=seed, batch_seed=SEED_OFFSET + seed, quick=quick,
            image_size=image_size, inject_failures=INJECT_FAILURES, generation_seconds=gen_seconds,
            prf=prf_info, kcf=kcf_info, machine=common.machine(), wall_seconds=time.perf_counter() - started,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )  # fmt: skip
        write_outputs(result, labels, runs, min_effect, out)
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return result


def summarise(labels: pd.DataFrame, runs: list[FilterRun], min_effect: float) -> dict[str, Any]:
    """Everything the JSON holds about quality: per-filter timing, quality and AUROC rows (DataFrames),
    the issue's targets."""
    above = common.evaluate_filters(labels, runs, min_effect)
    failed = labels[labels["injected_failure"] != common.FAITHFUL]
    effects = failed.groupby("injected_failure")["failure_effect"]
    timing = {}
    for r in runs:
        per_image = None if r.seconds is None else r.seconds / len(labels)
        timing[r.name] = {"seconds": r.seconds, "seconds_per_image": per_image, "note": r.note}
    return {
        "n_images": len(labels),
        "min_effect": min_effect,
        "counts": labels["injected_failure"].value_counts().sort_index().to_dict(),
        "effect_quantiles_10_50_90": {k: s.quantile([0.1, 0.5, 0.9]).round(4).tolist() for k, s in effects},
        "filters": timing,
        "quality_all_failures": common.evaluate_filters(labels, runs, None),
        "quality_above_min_effect": above,
        "auroc_all_failures": common.evaluate_scores(labels, runs, None),
        "auroc_above_min_effect": common.evaluate_scores(labels, runs, min_effect),
        "targets": check_targets(above, runs),
    }


def write_outputs(
    result: dict[str, Any], labels: pd.DataFrame, runs: list[FilterRun], min_effect: float, out: Path
) -> None:
    """filter_quality.json, filter_quality.md, filter_quality_roc.png, filter_quality_scores.png."""
    common.write_json(out / "filter_quality.json", result)
    (out / "filter_quality.md").write_text(markdown(result), encoding="utf-8")
    if any(r.scores for r in runs):
        common.plot_roc(labels, runs, out / "filter_quality_roc.png", min_effect)
        common.plot_distributions(labels, runs, out / "filter_quality_scores.png", min_effect)
    print(f"wrote {out / 'filter_quality.json'}, {out / 'filter_quality.md'} and plots in {out}")


def _pivot(rows: pd.DataFrame, value: str, index: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Rows ``index`` x columns subset (``all`` first) of ``value``, and the markdown column spec."""
    table = rows.pivot(index=index, columns="subset", values=value)
    subsets = [ALL, *sorted(set(table.columns) - {ALL})]
    body = [{index: i, **table.loc[i, subsets].to_dict()} for i in rows[index].drop_duplicates()]
    return body, [(index, index), *((s, s) for s in subsets)]


def markdown(result: dict[str, Any]) -> str:
    """The human-readable report of one run (``result`` as run_filter_quality returns it)."""
    above, everything = result["quality_above_min_effect"], result["quality_all_failures"]
    effect = f"effect >= {result['min_effect']:g} sqrt(A)"
    m = result["machine"]
    lines = [
        f"# Filter quality (seed {result['seed']}, batch seed {result['batch_seed']}"
        f"{', QUICK smoke run' if result['quick'] else ''})\n",
        f"{result['n_images']} images at {result['image_size']} px; images per injected failure: "
        f"{result['counts']}. PRF checkpoints: {result['prf']['checkpoints']}. Machine: {m['platform']}, "
        f"{m['cpu_count']} CPUs, GPU {m['gpu']}.\n",
        f"## Overall (failures with {effect}; all failures in brackets)\n",
    ]
    rows = []
    ranked = above[above.subset == ALL].itertuples(), everything[everything.subset == ALL].itertuples()
    for a, b in zip(*ranked, strict=True):
        row = {"filter": a.filter, "kept": a.kept_fraction, "per_image": a.seconds_per_image}
        for key in ("precision", "recall", "f1"):
            row[key] = f"{common.fmt(getattr(a, key))} ({common.fmt(getattr(b, key))})"
        rows.append(row)
    cols = [("filter", "filter"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1"),
            ("kept", "kept fraction"), ("per_image", "seconds / image")]  # fmt: skip
    lines.append(common.markdown_table(rows, cols))
    lines.append(f"\n## F1 per failure type ({effect}; each type against all faithful images)\n")
    lines.append(common.markdown_table(*_pivot(above, "f1", "filter")))
    lines.append("\n## F1 per failure type (all failures)\n")
    lines.append(common.markdown_table(*_pivot(everything, "f1", "filter")))
    auroc = result["auroc_above_min_effect"]
    if len(auroc):
        lines.append(f"\n## AUROC of each score ({effect})\n")
        lines.append(common.markdown_table(*_pivot(auroc, "auroc", "score")))
    if result["targets"]:
        lines.append(f"\n## The issue's targets ({effect})\n")
        verdict = {True: "yes", False: "NO", None: "n/a (no such failures)"}
        rows = [{**t, "pass": verdict[t["pass"]]} for t in result["targets"]]
        lines.append(common.markdown_table(rows, [("check", "check"), ("value", "value"), ("pass", "met")]))
    return "\n".join(lines)


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every filter benchmark shares: PRF checkpoints and thresholds, KCF config and
    thresholds, torch threads. Read them back with `filter_setup_from_args`."""
    parser.add_argument(
        "--models", type=Path, nargs="+", help="PRF checkpoints, in the thresholds file's order"
    )
    parser.add_argument(
        "--thresholds", type=Path, default=ROOT / "thresholds.yaml", help="PRF thresholds file"
    )
    parser.add_argument("--kcf-config", type=Path, help="KCF config YAML (default: the packaged CPU config)")
    parser.add_argument(
        "--kcf-thresholds",
        type=Path,
        default=KCF_THRESHOLDS,
        help="KCF thresholds YAML (default: kcf/configs/thresholds_geodesic.yaml, geodesic <= 90 degrees)",
    )
    parser.add_argument(
        "--kcf-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="KCF config override (repeatable), e.g. model.pretrained_path=null (from scratch)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); see README")


def filter_setup_from_args(args: argparse.Namespace) -> FilterSetup:
    """Apply --threads and build the FilterSetup from the options of `add_filter_arguments`."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from prf.train import parse_overrides

    try:
        overrides = parse_overrides(args.kcf_set)
    except ValueError as err:
        raise SystemExit(f"--kcf-set: {err}") from None
    return FilterSetup(args.models, args.thresholds, args.kcf_config, overrides, args.kcf_thresholds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seed", type=int, default=0, help=f"benchmark seed S (batch seed {SEED_OFFSET} + S)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, written to a temporary folder")
    add_filter_arguments(parser)
    parser.add_argument("--n", type=int, help="images in the benchmark batch (full 1200, quick 24)")
    parser.add_argument("--size", type=int, help="image side in pixels (full 128, quick 64)")
    parser.add_argument("--min-effect", type=float, default=DEFAULT_MIN_EFFECT, help="sqrt(A) units")
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results; quick: a tmp dir)"
    )
    parser.add_argument("--work", type=Path, help="keep the batch and SCORES here (resumable)")
    args = parser.parse_args(argv)
    setup = filter_setup_from_args(args)
    result = run_filter_quality(
        args.seed, args.quick, args.out, setup=setup, n=args.n, image_size=args.size,
        min_effect=args.min_effect, work_dir=args.work,
    )  # fmt: skip
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
