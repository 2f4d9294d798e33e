"""Failure visibility: how many injected failures move what the picture shows, and how each filter does on
the ones that do.

    python benchmarks/failure_visibility.py WORK [WORK ...] [--min-effect 0.15] [--out DIR] [--quick]

WORK is a ``filter_quality.py --work`` folder: its ``batch/``, ``prf_scores.parquet`` and (when KCF ran)
``kcf_scores.parquet``; one per benchmark seed.

A BATCH records each failure's effect (``failure_effect``): the largest image-space displacement of ANY
keypoint between the annotated and the shown pose, in sqrt(silhouette area) units. A paw that moves behind
the body counts as much as one in plain view, though no image-based filter can see it. This benchmark
re-renders every failure of the batch (``GenerationPipeline.render_states``, deterministic in the batch's
seeds; the recorded effect is reproduced first, or it stops) and measures its VISIBLE effect: the same
displacement over the keypoints visible (inside the image, not occluded) in at least one of the two
renders. A missing limb's effect is the vanished limb's area, visible by construction, and stays as it is.

Reported per failure type: how many failures have effect >= ``--min-effect`` and how many of them have a
visible effect below it; then each filter's recall and F1 (each type against all faithful images, as in
filter_quality.py) and the AUROC of its scores, on failures with effect >= min-effect (filter_quality's
subset) and on those with visible effect >= min-effect. The benchmark batch and the filters are unchanged:
only which failures count as visible changes. Writes failure_visibility.json and failure_visibility.md to
--out (default benchmarks/results; --quick: a 24-image filter_quality --quick run in a temporary folder,
a smoke test whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.filter_quality import DEFAULT_MIN_EFFECT, RESULTS, build_runs  # noqa: E402
from generation.run import render_pipeline_of_batch  # noqa: E402

if TYPE_CHECKING:
    from generation.pipeline import GenerationPipeline

# Scores whose AUROC the markdown shows (the JSON has every score of every filter).
SHOWN_SCORES = ("A_max_rel_kp_error", "A_pck", "kcf_geodesic")
EFFECT_TOLERANCE = 1e-4  # sqrt(A) units: re-rendered vs recorded effect (float32 keypoints)


def visible_effects(batch: Path, labels: pd.DataFrame, pipeline: GenerationPipeline) -> pd.Series:
    """Visible effect (module docstring) of every failure in ``labels`` (image_id index; faithful images
    0), re-rendered with ``pipeline`` (``render_pipeline_of_batch(batch)``; closed here). Raises
    ValueError naming the image when a re-render does not reproduce the recorded effect or type (the
    batch was made by other generation code, body model or pose source)."""
    from generation.pipeline import failure_effect

    visible = pd.Series(0.0, index=labels["image_id"].to_numpy(), name="visible_effect")
    failed = labels[labels["injected_failure"] != common.FAITHFUL]
    try:
        for image_id, kind, recorded in failed[["image_id", "injected_failure", "failure_effect"]].itertuples(
            index=False
        ):
            if not str(image_id).isdigit():  # prf generate names image k "%08d" % k
                raise ValueError(f"{batch}: image id {image_id!r} is not a generated image's index")
            plan = pipeline.plan(int(image_id))
            states = pipeline.render_states(plan)
            if plan.failure != kind or abs(states.effect - recorded) > EFFECT_TOLERANCE:
                raise ValueError(
                    f"{batch}: image {image_id} re-renders as {plan.failure} with effect "
                    f"{states.effect:.5f}, but the BATCH records {kind} with effect {recorded:.5f}: it was "
                    "made by other generation code, body model or pose source, so its renders cannot be "
                    "reproduced here"
                )
            hidden = states.state.hidden_part
            visible[image_id] = failure_effect(states.truth, states.shown, hidden, visible_only=True)
    finally:
        pipeline.backend.close()
    return visible


def with_full_recall_f1(quality: pd.DataFrame) -> pd.DataFrame:
    """``quality`` (common.evaluate_filters rows) plus ``f1_full_recall``: the F1 the filter would reach if
    it also rejected every failure of the subset, with its false alarms unchanged, 2 n / (2 n + fp). With
    each type scored against all faithful images, it bounds a type's F1 at the filter's false-alarm rate."""
    failed, false_alarms = quality["n_failed"], quality["fp"]
    return quality.assign(f1_full_recall=(2 * failed / (2 * failed + false_alarms)).where(failed > 0))


def analyse(work: Path, min_effect: float) -> dict[str, Any]:
    """One filter_quality work folder: failure counts, visible fractions, quality and AUROC both ways."""
    batch = work / "batch"
    labels = common.load_labels(batch)
    prf_path, kcf_path = work / "prf_scores.parquet", work / "kcf_scores.parquet"
    prf = common.read_scores(prf_path)
    kcf = common.read_scores(kcf_path) if kcf_path.is_file() else None
    started = time.perf_counter()
    pipeline = render_pipeline_of_batch(batch)
    visible = visible_effects(batch, labels, pipeline)
    render_seconds = time.perf_counter() - started
    seen = labels.assign(failure_effect=visible.loc[labels["image_id"]].to_numpy())
    runs = build_runs(labels, prf, None, kcf, None)
    failed = labels[labels["injected_failure"] != common.FAITHFUL]
    counts = []
    for kind, group in failed.groupby("injected_failure"):
        big = group["failure_effect"].to_numpy() >= min_effect
        shown = visible.loc[group["image_id"]].to_numpy() >= min_effect
        counts.append(
            {"type": kind, "failures": len(group), "effect_above": int(big.sum()),
             "visible_above": int((big & shown).sum()), "hidden_among_above": int((big & ~shown).sum())}
        )  # fmt: skip
    return {
        "work": str(work),
        "batch_seed": pipeline.config.seed,
        "n_images": len(labels),
        "render_seconds": render_seconds,
        "counts": pd.DataFrame(counts),
        "visible_effect": visible[failed["image_id"]].round(5).to_dict(),
        "quality_effect": with_full_recall_f1(common.evaluate_filters(labels, runs, min_effect)),
        "quality_visible": with_full_recall_f1(common.evaluate_filters(seen, runs, min_effect)),
        "auroc_effect": common.evaluate_scores(labels, runs, min_effect),
        "auroc_visible": common.evaluate_scores(seen, runs, min_effect),
    }


def _both_ways(seeds: list[dict[str, Any]], table: str, value: str, key: str, wanted: str) -> dict[str, str]:
    """subset -> "recorded -> visible": ``value`` of the rows of ``table`` whose ``key`` is ``wanted``, mean
    over seeds, on failures with effect >= min-effect and on those with visible effect >= min-effect."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for seed in seeds:
        recorded, visible = seed[f"{table}_effect"], seed[f"{table}_visible"]
        recorded = recorded[recorded[key] == wanted].set_index("subset")[value]
        visible = visible[visible[key] == wanted].set_index("subset")[value]
        for subset in recorded.index:
            pairs.setdefault(subset, []).append((float(recorded[subset]), float(visible[subset])))
    return {s: f"{_mean([a for a, _ in both])} -> {_mean([b for _, b in both])}" for s, both in pairs.items()}


def _mean(values: list[float]) -> str:
    """The mean of the finite values, to 3 decimals; ``n/a`` when none is (e.g. no failure of a type)."""
    finite = [v for v in values if np.isfinite(v)]
    return f"{np.mean(finite):.3f}" if finite else "n/a"


def markdown(result: dict[str, Any]) -> str:
    """The report: counts per type, then recorded -> visible for the PRF intersection, KCF and AUROCs."""
    seeds = result["seeds"]
    m = result["machine"]
    effect = f"effect >= {result['min_effect']:g} sqrt(A)"
    quick = ", QUICK smoke run" if result["quick"] else ""
    lines = [
        f"# Failure visibility ({len(seeds)} benchmark batch(es){quick})\n",
        f"Work folders: {', '.join(s['work'] for s in seeds)}. Machine: {m['platform']}, "
        f"{m['cpu_count']} CPUs.\n",
        f"## Failures with {effect}, and how many of them move no visible keypoint that far (all seeds)\n",
    ]
    counts = pd.concat([s["counts"] for s in seeds]).groupby("type").sum(numeric_only=True).reset_index()
    counts["hidden_fraction"] = counts["hidden_among_above"] / counts["effect_above"].where(
        counts["effect_above"] > 0
    )
    rows = counts.to_dict("records")
    cols = [("type", "type"), ("failures", "failures"), ("effect_above", effect),
            ("visible_above", "... and visible too"), ("hidden_fraction", "hidden fraction")]  # fmt: skip
    lines.append(common.markdown_table(rows, cols))
    filters = list(seeds[0]["quality_effect"]["filter"].drop_duplicates())
    prf_both = [n for n in filters if n.startswith("prf_")][-1:]
    lines.append(
        f"\n## Recorded effect -> visible effect (mean over seeds; failures with {effect} -> with visible "
        "effect that large; each type against all faithful images; f1_full_recall: the F1 if the filter "
        "also rejected every such failure, with its false alarms unchanged)\n"
    )
    rows = []
    for name in [*prf_both, "kcf"]:
        if name not in filters:
            continue
        for value in ("recall", "f1", "f1_full_recall"):
            rows.append({"what": f"{name} {value}", **_both_ways(seeds, "quality", value, "filter", name)})
    shown = set(seeds[0]["auroc_effect"]["score"])
    for score in [s for s in SHOWN_SCORES if s in shown]:
        rows.append({"what": f"AUROC {score}", **_both_ways(seeds, "auroc", "auroc", "score", score)})
    subsets = [common.ALL, *sorted(set(seeds[0]["quality_effect"]["subset"]) - {common.ALL})]
    lines.append(common.markdown_table(rows, [("what", ""), *((s, s) for s in subsets)]))
    return "\n".join(lines)


def run_failure_visibility(
    works: list[Path],
    min_effect: float = DEFAULT_MIN_EFFECT,
    out_dir: Path | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Analyse every work folder; write failure_visibility.json / .md to ``out_dir``; the JSON dict."""
    started = time.perf_counter()
    seeds = [analyse(Path(w), min_effect) for w in works]
    result = {
        "benchmark": "failure_visibility", "quick": quick, "min_effect": min_effect, "seeds": seeds,
        "machine": common.machine(), "wall_seconds": time.perf_counter() - started,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "failure_visibility.json", result)
    (out / "failure_visibility.md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {out / 'failure_visibility.json'} and {out / 'failure_visibility.md'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("works", nargs="*", type=Path, help="filter_quality.py --work folders (one per seed)")
    parser.add_argument("--min-effect", type=float, default=DEFAULT_MIN_EFFECT, help="sqrt(A) units")
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results; quick: a tmp dir)"
    )
    parser.add_argument("--quick", action="store_true", help="on a filter_quality --quick run (smoke test)")
    args = parser.parse_args(argv)
    works = list(args.works)
    out = args.out
    if args.quick:
        from benchmarks.filter_quality import run_filter_quality

        scratch = Path(tempfile.mkdtemp(prefix="fv-quick-"))
        run_filter_quality(0, quick=True, out_dir=scratch / "fq", work_dir=scratch / "work")
        works, out = [scratch / "work"], out or scratch
    if not works:
        parser.error("give at least one filter_quality.py --work folder (or --quick)")
    for work in works:
        for needed in (work / "batch" / "batch.json", work / "prf_scores.parquet"):
            if not needed.is_file():
                parser.error(f"{needed} does not exist: is {work} a filter_quality.py --work folder?")
    run_failure_visibility(works, args.min_effect, out, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
