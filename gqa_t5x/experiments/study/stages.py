"""The study's stages, each resumable: pre-train, convert, uptrain, evaluate,
fine-tune, time.

Every training, conversion and fine-tuning stage runs through the shared
`experiments.stages.StageRunner` (the sweeps' runner): a `launcher.Launch`
run in this process, a finished stage leaves
`OUTPUT/markers/<stage>.done.json` (with its wall time) and is skipped by a
rerun, and an interrupted training stage resumes from its MODEL_DIR (the
trainer restores the newest checkpoint). Evaluations are files
(`OUTPUT/evals/<key>.npz` + `.json`), written atomically.

Uptraining runs once per (variant, method, recipe, seed) to the largest
alpha it needs and keeps a checkpoint at each alpha it is evaluated at: T5's
inverse-square-root schedule depends only on the global step, so the
checkpoint at step P + alpha * P of a longer run is the run of length alpha.

Every training run reads the study's data cache (`OUTPUT/data/cache`, one
pass of the pre-training stream, written once): pre-training reads rows
[0, P * batch); an uptraining run of seed s continues after them, at row
P * batch + s * (max alpha * P * batch) (`StudySettings.data_row`), so it
sees rows nobody trained on and each seed its own; the multi-head
continuation also restores the optimizer state, so it is exactly the
pre-training run carried on (`tests/training`: bit for bit).

How to add a stage (one module, this one): a `Stages` method that returns
early on `self.done(name)`, runs its work (a `stages.train_launch` through
`self.runner.launch`, or plain Python) and ends with
`self.mark(name, info, started)`; then one call of it in `run_stages`, in
the order of the study. The report lists stage wall times from the markers
by the name's first word; analysing the new stage's output is the report's
business (`analysis.py`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gqa_t5x.experiments import stages
from gqa_t5x.experiments.study import data as rdata
from gqa_t5x.experiments.study import evaluation as reval
from gqa_t5x.experiments.study.settings import (
    SEEDED_METHODS,
    StudySettings,
    UptrainRun,
    conversion_name,
    eval_key,
    split_label,
    uptrain_run,
    variant,
)
from gqa_t5x.storage import paths

MODEL_GIN = "gin/models/t5_1_1/small.gin"  # its shape is overridden by study.gin
WMT_TASK = "wmt14_ende"


def write_json(path: Path, value: Any) -> None:
    """Writes JSON whole or not at all (`storage.paths.replace_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.replace_file(path, json.dumps(value, indent=2))


class Stages:
    """Runs the study's stages under one output directory.

    Args:
      output: OUTPUT.
      settings: The study's settings.
      data: The prepared data (`data.prepare_data`).
      pretrain_seed: Seed of pre-training.
      log: Progress messages.
    """

    def __init__(self, output: Path, settings: StudySettings, data: rdata.StudyData, pretrain_seed: int,
                 log: Callable[[str], None] = print, on_mark: Callable[[], None] | None = None):
        self.out, self.s, self.data, self.pretrain_seed, self.log = output, settings, data, pretrain_seed, log
        self.runner = stages.StageRunner(log=log, on_mark=on_mark)
        self.markers = output / "markers"
        self.evals = output / "evals"
        self._heldout: dict[str, Any] | None = None

    # ------------------------------------------------------------ helpers
    def done(self, stage: str) -> dict | None:
        """The marker of a finished stage, or None."""
        return self.runner.done(self.markers, stage)

    def mark(self, stage: str, info: dict, started: float) -> dict:
        """Records a finished stage with its wall time."""
        self.markers.mkdir(parents=True, exist_ok=True)
        return self.runner.mark(self.markers, stage, info, started)

    @property
    def heldout(self) -> dict[str, Any]:
        """The held-out example sets, loaded once."""
        if self._heldout is None:
            self._heldout = {name: rdata.load_arrays(self.data.heldout(name)) for name, _ in self.s.heldout_examples}
        return self._heldout

    def _gin_files(self, *extra: Path) -> tuple[str, ...]:
        return (str(self.data.study_gin), *(str(p) for p in extra))

    def _cache_bindings(self) -> tuple[str, ...]:
        """Training reads the study's cache, in the pre-training seed's order."""
        return (f"DATA_CACHE_DIR={stages.gin_str(self.data.cache)}",
                f"train/datasets.DatasetConfig.seed={self.pretrain_seed}")

    def _train(self, model_dir: Path, initial: str | None, kv_heads: int, bindings: tuple[str, ...],
               extra_gins: tuple[Path, ...] | None = None, cached: bool = True) -> Any:
        gins = self._gin_files(self.data.pretrain_gin, *(extra_gins or ()))
        return self.runner.launch(stages.train_launch(
            MODEL_GIN, stages.UPTRAIN_GIN, gins, kv_heads, model_dir, initial,
            (*(self._cache_bindings() if cached else ()), *bindings)))

    def write_cache(self, seeds: tuple[int, ...]) -> None:
        """Writes the training data cache: pre-training's rows and every seed's stretch after them."""
        done = self.done("cache")
        rows = self.s.cache_rows(seeds)
        if done and done["rows"] >= rows:
            return
        if done:
            raise ValueError(f"{self.data.cache} holds {done['rows']} rows, but seeds {list(seeds)} need {rows} "
                             "(each seed reads its own rows after pre-training's); use a new --output "
                             "or seeds no larger than before.")
        from gqa_t5x import gin_config
        from gqa_t5x.data import cache

        start = time.time()
        self.log(f"[data] cache: {rows} rows of span corruption (pre-training {self.s.pretrain_rows} + "
                 f"{self.s.uptrain_rows} per seed) in {self.data.cache}")
        launch = stages.train_launch(MODEL_GIN, stages.UPTRAIN_GIN, self._gin_files(self.data.pretrain_gin),
                                     self.s.num_heads, self.out / "pretrain", None, self._cache_bindings())
        gin_config.parse_gin(list(launch.gin_files), list(launch.gin_bindings), check_required=False)
        cfg = cache.configured_dataset()
        cache.write_cache(cfg, str(self.data.cache), max_rows=rows, progress=False)
        self.mark("cache", {"rows": rows, "root": str(self.data.cache)}, start)

    # ------------------------------------------------------------ stages
    def pretrain(self) -> str:
        """Pre-trains the multi-head model for P steps; returns its final checkpoint."""
        done = self.done("pretrain")
        if done:
            return done["checkpoint"]
        s, start = self.s, time.time()
        model_dir = self.out / "pretrain"
        self.log(f"[pretrain] MHA ({s.num_heads} heads), {s.pretrain_steps} steps of span corruption")
        summary = self._train(model_dir, None, s.num_heads, (
            f"TRAIN_STEPS={s.pretrain_steps}", f"RANDOM_SEED={self.pretrain_seed}",
            f"CHECKPOINT_PERIOD={s.pretrain_steps // s.curve_points}", "KEEP_CHECKPOINTS=None"))
        every = max(1, len(summary.losses) // 200)
        losses = [[summary.start_step + i + 1, loss] for i, loss in enumerate(summary.losses)][::every]
        checkpoint = str(model_dir / f"checkpoint_{s.pretrain_steps}")
        return self.mark("pretrain", {"checkpoint": checkpoint, "train_loss": losses,
                                      "train_loss_from_step": summary.start_step}, start)["checkpoint"]

    def evaluate(self, key: str, checkpoint: str, sets: dict[str, Any] | None = None) -> dict:
        """Scores a checkpoint on the held-out sets (once); returns its summary.

        Args:
          key: The evaluation's name (`settings.eval_key`).
          checkpoint: The checkpoint.
          sets: {name: examples} (default: the span-corruption held-out sets).
        """
        path = self.evals / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        start = time.time()
        scores = reval.score_checkpoint(checkpoint, self.heldout if sets is None else sets)
        self.evals.mkdir(parents=True, exist_ok=True)
        rdata.save_arrays(self.evals / f"{key}.npz", scores)
        info = {"key": key, "checkpoint": checkpoint, "summary": reval.summary(scores),
                "wall_s": round(time.time() - start, 2)}
        write_json(path, info)
        text = ", ".join(f"{n} loss {v['loss']:.4f} acc {v['accuracy']:.3f}" for n, v in info["summary"].items())
        self.log(f"[eval] {key}: {text}")
        return info

    def pretrain_curve(self) -> None:
        """Evaluates every pre-training checkpoint (the loss curve)."""
        period = self.s.pretrain_steps // self.s.curve_points
        for step in range(period, self.s.pretrain_steps + 1, period):
            self.evaluate(f"pretrain_{step}", str(self.out / "pretrain" / f"checkpoint_{step}"))

    def calibrate(self, source: str) -> Path:
        """Calibration statistics of the pre-trained model for `lsq`."""
        from gqa_t5x import checkpoints
        from gqa_t5x.conversion import calibration

        path = self.out / "stats" / "calibration.npz"
        if self.done("calibrate"):
            return path
        start = time.time()
        config, params = checkpoints.load(source)
        examples = rdata.load_arrays(self.data.calibration)
        n = examples["encoder_input_tokens"].shape[0]
        batches = [{k: v[i:i + 64] for k, v in examples.items()} for i in range(0, n, 64)]
        calibration.save_statistics(path, calibration.collect_statistics(config, params, batches))
        self.mark("calibrate", {"statistics": str(path), "examples": n}, start)
        return path

    def convert(self, source: str, kv_heads: int, method: str, seed: int | None, statistics: Path) -> str:
        """Converts the pre-trained model (once per deterministic method, per seed otherwise)."""
        from gqa_t5x import conversion

        name = conversion_name(kv_heads, method, seed)
        needs_statistics = conversion.get_method(method).needs_calibration
        return self.runner.convert(self.markers, f"convert_{name}", source=source,
                                   output=self.out / "convert" / name, num_kv_heads=kv_heads, method=method,
                                   seed=seed or 0, calibration=statistics if needs_statistics else None)

    def uptrain(self, initial: str, run: UptrainRun, *, name: str | None = None,
                model_bindings: tuple[str, ...] = ()) -> dict[float, str]:
        """Uptrains `run` to the largest of its alphas, keeping a checkpoint at
        each; returns {alpha: checkpoint}.

        Args:
          initial: The converted (or multi-head) checkpoint it starts from.
          run: What to train.
          name: The run's directory and marker name (default `uptrain_run`).
          model_bindings: Gin bindings of the model beyond NUM_KV_HEADS (a
            planned variant's DECODER_SELF_KV_HEADS=..., `planned.py`).
        """
        s = self.s
        name = name or uptrain_run(run.kv_heads, s.num_heads, run.method, run.seed)
        model_dir = self.out / "uptrain" / name
        alpha_max = max(run.alphas)
        checkpoints_at = {a: str(model_dir / f"checkpoint_{s.pretrain_steps + s.alpha_steps(a)}") for a in run.alphas}
        done = self.done(f"uptrain_{name}")
        if done and all(str(a) in done["checkpoints"] for a in run.alphas):
            return checkpoints_at
        if done:  # Made before the settings gained an alpha (ADDITIVE_SETTINGS): train it again.
            old = model_dir.with_name(f"{name}.superseded")
            missing = sorted(a for a in run.alphas if str(a) not in done["checkpoints"])
            self.log(f"[uptrain] {name} has no checkpoint at alpha {', '.join(f'{a:g}' for a in missing)}: training "
                     f"it again (the earlier run moves to {old})")
            if old.exists():
                shutil.rmtree(old)
            model_dir.rename(old)
            (self.markers / f"uptrain_{name}.done.json").unlink()
        start = time.time()
        row = s.data_row(run.seed, replay=run.replays)
        state = "pre-training's optimizer state" if run.keeps_state else "a fresh optimizer state"
        self.log(f"[uptrain] {name}: alpha up to {alpha_max:g} ({s.alpha_steps(alpha_max)} steps) from data row "
                 f"{row}, {state}")
        optimizer_state = stages.gin_str(self.pretrain_checkpoint) if run.keeps_state else None
        self._train(model_dir, initial, run.kv_heads, (
            f"TRAIN_STEPS={s.pretrain_steps + s.alpha_steps(alpha_max)}", f"RANDOM_SEED={run.seed}",
            f"CHECKPOINT_PERIOD={s.checkpoint_period(run.alphas)}", "KEEP_CHECKPOINTS=None",
            f"INITIAL_DATA_ROW={row}", f"INITIAL_OPTIMIZER_STATE={optimizer_state}", *model_bindings))
        missing = [p for p in checkpoints_at.values() if not Path(p).is_dir()]
        if missing:
            raise RuntimeError(f"Uptraining {name} did not leave the checkpoints {missing}.")
        self.mark(f"uptrain_{name}", {"checkpoints": {str(a): p for a, p in checkpoints_at.items()},
                                      "data_row": row, "optimizer_state": optimizer_state}, start)
        return checkpoints_at

    @property
    def pretrain_checkpoint(self) -> str:
        """The pre-training's last checkpoint (parameters and optimizer state)."""
        return str(self.out / "pretrain" / f"checkpoint_{self.s.pretrain_steps}")

    def uptrain_and_evaluate(self, initial: str, run: UptrainRun) -> None:
        """`uptrain`, then `evaluate` at each of its alphas."""
        for alpha, checkpoint in self.uptrain(initial, run).items():
            self.evaluate(eval_key(run.kv_heads, self.s.num_heads, run.method, alpha, run.seed), checkpoint)

    def finetune_c4(self, initial: str, kv_heads: int, method: str | None, seed: int) -> dict:
        """The short fine-tune on the C4 sample (a new domain) of an alpha-0
        model, scored on the C4 held-out set (claim C3b)."""
        s = self.s
        key = f"ft_{eval_key(kv_heads, s.num_heads, method, 0.0, None)}_s{seed}"
        if (self.evals / f"{key}.json").exists():
            return self.evaluate(key, "", {})
        model_dir = self.out / "finetune_c4" / key
        start = time.time()
        self.log(f"[finetune] {key}: {s.c4_finetune_steps} steps on C4 span corruption")
        self._train(model_dir, initial, kv_heads, (
            f"MIXTURE_OR_TASK_NAME={stages.gin_str(rdata.C4_TASK)}", f"BATCH_SIZE={s.c4_finetune_batch}",
            f"TRAIN_STEPS={s.pretrain_steps + s.c4_finetune_steps}", f"RANDOM_SEED={seed}",
            f"CHECKPOINT_PERIOD={s.c4_finetune_steps}", "KEEP_CHECKPOINTS=1"), cached=False)
        final = str(model_dir / f"checkpoint_{s.pretrain_steps + s.c4_finetune_steps}")
        self.mark(f"finetune_{key}", {"checkpoint": final}, start)  # its wall time in the report's stage list
        return self.evaluate(key, final, {rdata.C4: self.heldout[rdata.C4]})

    def finetune(self, kv_heads: int, method: str | None, seed: int, initial: str) -> float:
        """Fine-tunes on WMT En-De, scores BLEU (the runner's fine-tune stage) and the
        teacher-forced loss on the same validation pairs; returns BLEU."""
        s = self.s
        name = f"{uptrain_run(kv_heads, s.num_heads, method, seed)}_a{s.ablation_alpha:g}"
        run_dir = self.out / "finetune" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.done(f"finetune_{name}") is None:
            self.log(f"[finetune] {name}: WMT En-De, {s.finetune_steps} steps, BLEU on {s.bleu_examples} pairs")
        start = time.time()
        bleu = self.runner.finetune_and_eval(
            run_dir, task=WMT_TASK, model_gin=MODEL_GIN, gin_files=self._gin_files(self.data.wmt_gin),
            num_kv_heads=kv_heads, initial=initial, steps=s.finetune_steps,
            # The trainer evaluates at multiples of EVAL_PERIOD and at the last step: only the last.
            finetune_bindings=(f"RANDOM_SEED={seed}", f"EVAL_PERIOD={10**9}"), final_eval=False)
        final = stages.latest_checkpoint(run_dir / f"finetune_{WMT_TASK}")
        wmt = {rdata.WMT_SET: rdata.load_arrays(self.data.heldout(rdata.WMT_SET))}
        self.evaluate(f"wmt_{name}", final, wmt)
        if self.done(f"finetune_{name}") is None:
            self.mark(f"finetune_{name}", {"bleu": bleu, "seed": seed, "kv_heads": kv_heads, "checkpoint": final},
                      start)
        return float(bleu)

    def time_decoding(self, checkpoints_by_name: dict[str, str]) -> dict:
        """Interleaved time per sample of the variants (`evaluation.time_variants`)."""
        done = self.done("timing")
        if done:
            return done
        start = time.time()
        s = self.s
        what = ", ".join(checkpoints_by_name) or f"random-weight models of shape {s.timing_model}"
        self.log(f"[timing] {what} at (input, output) {list(s.timing_shapes)}")
        if s.timing_model is None:
            result = reval.time_variants(checkpoints_by_name, s.timing_shapes, batch=s.timing_batch,
                                         rounds=s.timing_rounds)
            result["checkpoints"] = checkpoints_by_name
        else:
            emb, head_dim, mlp, layers = s.timing_model
            kv_heads = [s.num_heads, s.gqa_kv_heads, *s.group_kv_heads, 1]
            result = reval.time_random_variants(
                s.num_heads, kv_heads, emb_dim=emb, head_dim=head_dim, mlp_dim=mlp, num_layers=layers,
                vocab_size=s.vocab_size, shapes=s.timing_shapes, batch=s.timing_batch, rounds=s.timing_rounds)
        return self.mark("timing", result, start)


def run_stages(output: Path, settings: StudySettings, seeds: tuple[int, ...], pretrain_seed: int,
                shared: Path | None, corpus: rdata.Corpus | None, log: Callable[[str], None],
                on_mark: Callable[[], None] | None = None) -> None:
    """Runs (or resumes) the study's stages 1-7 in order; the report is `reproduction.run_study`'s."""
    started = time.time()
    data = rdata.StudyData(output / "data")
    stages = Stages(output, settings, data, pretrain_seed, log, on_mark)
    if data.info.exists():
        log("[1/8] data: prepared by an earlier session")
    else:
        log("[1/8] data")
        rdata.prepare_data(output, settings, shared, log, corpus=corpus)
        stages.mark("data", {"root": str(data.root)}, started)
    stages.write_cache(seeds)
    s, h = settings, settings.num_heads
    log("[2/8] pre-training")
    mha = stages.pretrain()
    stages.pretrain_curve()
    stages.evaluate("mha_a0", mha)
    log("[3/8] calibration statistics")
    statistics = stages.calibrate(mha)
    log("[4/8] conversions at alpha = 0")
    converted: dict[tuple[int, str, int | None], str] = {}
    for kv in s.converted_variants():
        for method in s.methods_for(kv):
            for seed in (s.seeds_of(method, seeds) if seeded(method) else (None,)):
                converted[(kv, method, seed)] = path = stages.convert(mha, kv, method, seed, statistics)
                stages.evaluate(eval_key(kv, h, method, 0.0, seed), path)
    if s.conversion_only:
        for line in skipped_stages():
            log(line)
        return

    def initial(kv: int, method: str | None, seed: int) -> str:
        if kv == h:
            return mha
        base = split_label(method)[0]
        return converted[(kv, base, seed if seeded(base) else None)]

    log("[5/8] uptraining (multi-head continuation and its 2x2 first)")
    runs = s.uptrain_runs(seeds)
    for run in runs:
        stages.uptrain_and_evaluate(initial(run.kv_heads, run.method, run.seed), run)
    log("[6/8] fine-tuning: the alpha-0 models on C4 (a new domain)" + (", WMT En-De" if s.finetune_variants else "")
        if s.c4_finetune_steps or s.finetune_variants else "[6/8] fine-tuning: none in these settings")
    if s.c4_finetune_steps:
        for seed in seeds:
            for kv in (h, s.gqa_kv_heads, 1):
                stages.finetune_c4(initial(kv, "mean", seed), kv, None if kv == h else "mean", seed)
    by_key = {(r.kv_heads, r.method, r.seed): r for r in runs}
    for seed in seeds[:s.finetune_seeds]:
        for kv, method in s.finetuned():
            checkpoint = stages.uptrain(initial(kv, method, seed), by_key[(kv, method, seed)])[s.ablation_alpha]
            stages.finetune(kv, method, seed, checkpoint)
    log("[7/8] time per sample")
    timed = {}
    if s.timing_model is None:
        for kv in (h, s.gqa_kv_heads, 1):
            method = None if kv == h else "mean"
            timed[variant(kv, h)] = stages.uptrain(initial(kv, method, seeds[0]),
                                                   by_key[(kv, method, seeds[0])])[s.ablation_alpha]
    stages.time_decoding(timed)


def skipped_stages() -> list[str]:
    """The lines naming stages 5-7, which conversion-only settings (the quickstart) skip."""
    why = "skipped: conversion only (alpha = 0), as the quickstart's settings ask"
    return [f"[5/8] uptraining: {why}", f"[6/8] fine-tuning: {why}", f"[7/8] time per sample: {why}"]


def seeded(method: str) -> bool:
    """True for methods whose conversion depends on the seed."""
    return method in SEEDED_METHODS
