"""`gqa-t5x reproduce`: the GQA paper's findings at small scale, in one resumable command.

    gqa-t5x reproduce --output /tmp/repro --report_dir docs --seeds 0,1,2

Stages (each resumable, in the order of `stages.run_stages`):

1. data: a vocabulary, the WMT pairs that fit, gins, fixed held-out examples
   of Wikipedia and C4, calibration examples (`data.py`);
2. pre-training of a multi-head T5.1.1 (8 heads) on Wikipedia with span
   corruption, checkpoints along the way for the loss curve;
3. calibration statistics of that model (for `lsq`);
4. conversion to MQA and GQA-G with every method, evaluated at alpha = 0;
5. per seed: the multi-head model continued, and every (variant, method)
   uptrained (mean to the largest alpha, the others to the ablation alpha),
   evaluated at each alpha;
6. WMT En-De fine-tuning and BLEU of MHA, GQA and MQA (ablation alpha), per seed;
7. interleaved time per sample of the three;
8. analysis and report: `reproduction.md`, `reproduction.json`, figures.

`OUTPUT/study.json` records the settings and the pre-training seed; a rerun
with other settings is refused (the runs would not be comparable), except
that `ADDITIVE_SETTINGS` may grow (more alphas of the saving curve, more
kept-state methods: recorded under 'extended'), a rerun
with other seeds adds those seeds' runs and reports on the seeds it was given
(seeds no larger than the first session's: the data cache holds their rows).
On an accelerator JAX uses it without any setting here.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from typing import Any
from collections.abc import Callable, Sequence
from pathlib import Path

from gqa_t5x.errors import UsageError
from gqa_t5x.storage import paths
from gqa_t5x.experiments.study import analysis
from gqa_t5x.experiments.study import data as rdata
from gqa_t5x.experiments.study import report as rreport
from gqa_t5x.experiments.study import stages as study_stages
from gqa_t5x.experiments.study.settings import StudySettings, check_seeds
from gqa_t5x.experiments.study.stages import write_json

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_PRETRAIN_SEED = 100


def default_shared_dir() -> Path:
    """$GQA_T5X_SHARED, else a `shared` folder beside the checkout or the cwd.

    `../shared` of the source checkout gqa_t5x is imported from (an editable
    install, PYTHONPATH), else, for an installed package (which has no
    checkout), `../shared` of the working directory.
    """
    from gqa_t5x import gin_config

    if "GQA_T5X_SHARED" in os.environ:
        return Path(os.environ["GQA_T5X_SHARED"])
    return (gin_config.source_checkout() or Path.cwd()).parent / "shared"


# Settings a rerun may extend (a superset of the recorded values): they add
# runs or evaluated alphas and change none of the runs already made.
ADDITIVE_SETTINGS: tuple[str, ...] = ("saving_alphas", "keep_state_methods")


def _extends(field: str, found: Any, wanted: Any) -> bool:
    """Whether `wanted` only adds to `found` for an `ADDITIVE_SETTINGS` field."""
    return field in ADDITIVE_SETTINGS and isinstance(found, list) and set(found) <= set(wanted)


def check_output(output: Path, settings: StudySettings, pretrain_seed: int,
                 own: Sequence[str] = ()) -> dict | None:
    """The study record in OUTPUT, read only; refuses an OUTPUT the study cannot use.

    Called before anything is written, so a refused run leaves no trace.

    Args:
      output: The study's directory.
      settings: The settings of this run.
      pretrain_seed: Its pre-training seed.
      own: Entries a new OUTPUT may already hold (the quickstart's `corpus`).

    Returns:
      OUTPUT/study.json's record, or None for a new (absent or empty) OUTPUT.

    Raises:
      UsageError: OUTPUT holds a study with other settings (beyond the
        growth of `ADDITIVE_SETTINGS`), or other files and no study.
    """
    path = output / "study.json"
    wanted = {"settings": settings.to_json(), "pretrain_seed": pretrain_seed}
    if path.exists():
        record = json.loads(path.read_text())
        found = record.get("settings", {})
        changed = sorted(k for k in wanted["settings"] if found.get(k) != wanted["settings"][k])
        refused = [k for k in changed if not _extends(k, found.get(k), wanted["settings"][k])]
        if record.get("pretrain_seed") != pretrain_seed or refused:
            raise UsageError(
                f"{output} holds a study with other settings ({refused or ['pretrain_seed']}); its runs are not "
                "comparable with these. Use another --output, or the settings it was made with (only "
                f"{', '.join(ADDITIVE_SETTINGS)} may grow: they add runs)."
            )
        if changed:
            record["extended"] = [*record.get("extended", []),
                                  {k: {"from": found.get(k), "to": wanted["settings"][k]} for k in changed}]
            record["settings"] = wanted["settings"]
        return record
    own = {*own, ".jax_cache"}  # The command line's compilation cache (made before this check).
    others = sorted(p.name for p in output.iterdir() if p.name not in own) if output.is_dir() else []
    if others:
        raise UsageError(
            f"--output {output} is not empty ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}) and "
            "holds no study (study.json): a new run needs a new or empty directory; to continue a run, pass "
            "its directory."
        )
    return None


def _check_shared(shared: Path | None, corpus: rdata.Corpus | None) -> None:
    """Refuses a shared data folder that lacks what the study reads (before anything is written)."""
    if shared is None:
        return
    needed = ["data/c4", "data/wmt_ende"] + ([] if corpus is not None else ["data/wikipedia_en"])
    missing = [name for name in needed if not (shared / name).is_dir()]
    if missing:
        raise UsageError(
            f"The shared data folder {shared} lacks {', '.join(missing)}: pass --shared_dir (or set "
            "GQA_T5X_SHARED) to the folder holding data/wikipedia_en, data/c4 and data/wmt_ende."
        )


def run_study(output: str | os.PathLike, *, settings: StudySettings | None = None,
              seeds: Sequence[int] = DEFAULT_SEEDS, pretrain_seed: int = DEFAULT_PRETRAIN_SEED,
              shared_dir: str | os.PathLike | None = None, report_dir: str | os.PathLike | None = None,
              command: str | None = None, corpus: rdata.Corpus | None = None,
              log: Callable[[str], None] = print) -> dict[str, Path]:
    """Runs (or resumes) the whole study and writes its report.

    Args:
      output: Directory of every run, checkpoint and evaluation (resumable).
      settings: Sizes (default: the full study).
      seeds: Seeds of uptraining, fine-tuning and seeded methods (>= 2; 3 for the study).
      pretrain_seed: Seed of pre-training (not among `seeds`).
      shared_dir: The shared data folder (default: `default_shared_dir()`).
      report_dir: Where reproduction.md/.json and figures go (default OUTPUT/report).
      command: The command line to print in the report.
      corpus: Pre-train on this corpus and vocabulary instead of Wikipedia
        (the quickstart); `shared_dir` is then only read for C4/WMT.
      log: Progress messages.

    Returns:
      Name -> path of each report file.

    Raises:
      UsageError: invalid settings or seeds, or OUTPUT made with other settings.
    """
    settings = settings or StudySettings()
    try:
        settings.validate()
        seeds = check_seeds(seeds, pretrain_seed)
    except ValueError as e:
        raise UsageError(str(e)) from e
    # Checkpoints go through the storage layer, but SentencePiece, numpy and
    # matplotlib write local files: the study runs on local disk.
    out = Path(paths.local_file(output, purpose="gqa-t5x reproduce (local runs and evaluations)")).resolve()
    shared = Path(shared_dir) if shared_dir else (None if corpus is not None else default_shared_dir())
    record = check_output(out, settings, pretrain_seed, own=("corpus",) if corpus is not None else ())
    _check_shared(shared, corpus)
    out.mkdir(parents=True, exist_ok=True)
    if record is None:
        record = {"settings": settings.to_json(), "pretrain_seed": pretrain_seed, "sessions": []}
    start = time.time()
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seeds": list(seeds), "pretrain_seed": pretrain_seed,
               "wall_s": 0.0}
    record["sessions"].append(session)

    def record_wall_time() -> None:
        # After every finished stage, so that a killed session still counts up to its last stage.
        session["wall_s"] = round(time.time() - start, 1)
        write_json(out / "study.json", record)

    record_wall_time()
    if settings.is_reduced:
        log(f"*** {analysis.REDUCED_BANNER} ***")
    try:
        study_stages.run_stages(out, settings, seeds, pretrain_seed, shared, corpus, log, record_wall_time)
    finally:
        record_wall_time()
    log("[8/8] analysis and report")
    command = command or f"gqa-t5x reproduce --output {shlex.quote(str(output))} --seeds {','.join(map(str, seeds))}"
    results = analysis.analyse(out, settings, seeds, command=command, sessions=record["sessions"])
    files = rreport.write_report(results, Path(report_dir) if report_dir else out / "report")
    for line in rreport.summary_lines(results):
        log(line)
    log(f"report: {files['markdown']}")
    return files
