"""Held-out loss of contiguous vs similarity grouping on the study's pre-trained model.

The table of docs/conversion.md, "Grouping heads by similarity": the study's
pre-trained MHA checkpoint converted (alpha 0, no uptraining) to GQA-2 and
GQA-4 with `mean` and `align`, each with the contiguous and the similarity
grouping, scored on the held-out Wikipedia examples (`evaluation.score_params`).
The statistics are recomputed from the calibration examples (they include
`key_second_moment`). Differences are paired example by example, with a
bootstrap over whole articles (`statistics.paired_contrast`). Nothing is
written next to the study; results go to OUT (JSON and the checkpoints).

    python scripts/grouping_eval.py [--study /work/study_out] [--out /tmp/grouping_eval]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from gqa_t5x import checkpoints, conversion  # noqa: E402
from gqa_t5x.conversion import calibration  # noqa: E402
from gqa_t5x.experiments.study import data as study_data  # noqa: E402
from gqa_t5x.experiments.study import evaluation, statistics  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="/work/study_out", help="A finished study's output (read only).")
    parser.add_argument("--out", default="/tmp/grouping_eval", help="Where results and checkpoints go.")
    parser.add_argument("--kv_heads", default="2,4", help="Targets, comma-separated.")
    parser.add_argument("--methods", default="mean,align", help="Methods, comma-separated.")
    args = parser.parse_args()
    study, out = Path(args.study), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = study / "pretrain" / "checkpoint_4000"
    config, params = checkpoints.load(source)
    examples = study_data.load_arrays(study / "data" / "calibration.npz")
    n = examples["encoder_input_tokens"].shape[0]
    batches = [{k: v[i:i + 64] for k, v in examples.items()} for i in range(0, n, 64)]
    start = time.time()
    stats_path = calibration.save_statistics(out / "calibration.npz",
                                             calibration.collect_statistics(config, params, batches))
    print(f"statistics of {n} calibration examples: {time.time() - start:.1f} s", flush=True)
    heldout = study_data.load_arrays(study / "data" / "heldout_wikipedia.npz")
    articles = heldout.pop("article", None)
    scores = {"mha": evaluation.score_params(config, params, heldout)}
    results: dict[str, dict] = {"mha": {"loss": float(scores["mha"]["loss"].sum() / scores["mha"]["tokens"].sum())}}
    for kv in (int(g) for g in args.kv_heads.split(",")):
        for method in args.methods.split(","):
            for grouping in ("contiguous", "similarity"):
                name = f"gqa{kv}_{method}_{grouping}"
                start = time.time()
                conversion.convert_checkpoint(source, out / name, kv, method=method, grouping=grouping,
                                              calibration=str(stats_path), overwrite=True, progress=False)
                seconds = time.time() - start
                with checkpoints.open_checkpoint(out / name) as reader:
                    record = reader.metadata["conversion"]["grouping"]
                target, converted = checkpoints.load(out / name)
                scores[name] = evaluation.score_params(target, converted, heldout)
                loss = float(scores[name]["loss"].sum() / scores[name]["tokens"].sum())
                results[name] = {"loss": loss, "convert_s": seconds, "grouping": record}
                print(f"{name}: loss {loss:.4f} (convert {seconds:.1f} s)", flush=True)
            contiguous, similar = scores[f"gqa{kv}_{method}_contiguous"], scores[f"gqa{kv}_{method}_similarity"]
            interval = statistics.paired_contrast(
                [(1.0, similar["loss"], similar["tokens"]), (-1.0, contiguous["loss"], contiguous["tokens"])],
                articles)
            results[f"gqa{kv}_{method}_difference"] = {
                "similarity_minus_contiguous": interval.mean, "low": interval.low, "high": interval.high,
                "p_value": interval.p_value, "kind": interval.kind, "clusters": interval.n}
            print(f"gqa{kv} {method}: similarity - contiguous = {interval.mean:+.4f} "
                  f"[{interval.low:+.4f}, {interval.high:+.4f}] ({interval.kind}, n={interval.n}, "
                  f"p={interval.p_value:.3g})", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
