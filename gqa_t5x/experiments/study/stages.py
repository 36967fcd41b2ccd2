"""The study's stages, each resumable: pre-train, convert, uptrain, evaluate,
fine-tune, time.

Every training, conversion and fine-tuning stage runs through the shared
`experiments.stages.StageRunner` (the sweeps' runner): a `launcher.Launch`
run in this process, a finished stage leaves
`OUTPUT/markers/<stage>.done.json` (with its wall time) and is skipped by a
rerun, and an interrupted training stage resumes from its MODEL_DIR (the
trainer restores the newest checkpoint). Evaluations are files
(`OUTPUT/evals/<key>.npz` + `.json`), written atomically.

Uptraining runs once per (variant, method, seed) to the largest alpha it
needs and keeps a checkpoint at each alpha it is evaluated at: T5's
inverse-square-root schedule depends only on the global step, so the
checkpoint at step P + alpha * P of a longer run is the run of length alpha.

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
    conversion_name,
    eval_key,
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

    def _train(self, model_dir: Path, initial: str | None, kv_heads: int, bindings: tuple[str, ...]) -> Any:
        return self.runner.launch(stages.train_launch(
            MODEL_GIN, stages.UPTRAIN_GIN, self._gin_files(self.data.pretrain_gin), kv_heads, model_dir, initial,
            bindings))

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

    def uptrain(self, initial: str, kv_heads: int, method: str | None, seed: int) -> dict[float, str]:
        """Uptrains to the largest of `settings.uptrain_alphas(method)`, keeping a
        checkpoint at each; returns {alpha: checkpoint}."""
        s = self.s
        name = uptrain_run(kv_heads, s.num_heads, method, seed)
        model_dir = self.out / "uptrain" / name
        alphas = s.uptrain_alphas(method)
        alpha_max = max(alphas)
        checkpoints_at = {a: str(model_dir / f"checkpoint_{s.pretrain_steps + s.alpha_steps(a)}") for a in alphas}
        if self.done(f"uptrain_{name}"):
            return checkpoints_at
        start = time.time()
        self.log(f"[uptrain] {name}: alpha up to {alpha_max:g} ({s.alpha_steps(alpha_max)} steps)")
        self._train(model_dir, initial, kv_heads, (
            f"TRAIN_STEPS={s.pretrain_steps + s.alpha_steps(alpha_max)}", f"RANDOM_SEED={seed}",
            f"CHECKPOINT_PERIOD={s.checkpoint_period(alphas)}", "KEEP_CHECKPOINTS=None"))
        missing = [p for p in checkpoints_at.values() if not Path(p).is_dir()]
        if missing:
            raise RuntimeError(f"Uptraining {name} did not leave the checkpoints {missing}.")
        self.mark(f"uptrain_{name}", {"checkpoints": {str(a): p for a, p in checkpoints_at.items()}}, start)
        return checkpoints_at

    def uptrain_and_evaluate(self, initial: str, kv_heads: int, method: str | None, seed: int) -> None:
        """`uptrain`, then `evaluate` at each of its alphas."""
        for alpha, checkpoint in self.uptrain(initial, kv_heads, method, seed).items():
            self.evaluate(eval_key(kv_heads, self.s.num_heads, method, alpha, seed), checkpoint)

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
        self.log(f"[timing] {', '.join(checkpoints_by_name)} at (input, output) {list(s.timing_shapes)}")
        result = reval.time_variants(checkpoints_by_name, s.timing_shapes, batch=s.timing_batch, rounds=s.timing_rounds)
        result["checkpoints"] = checkpoints_by_name
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
    s, h, g = settings, settings.num_heads, settings.gqa_kv_heads
    log("[2/8] pre-training")
    mha = stages.pretrain()
    stages.pretrain_curve()
    stages.evaluate("mha_a0", mha)
    log("[3/8] calibration statistics")
    statistics = stages.calibrate(mha)
    log("[4/8] conversions at alpha = 0")
    converted: dict[tuple[int, str, int | None], str] = {}
    for kv in (1, g):
        for method in s.methods_for(kv):
            for seed in (seeds if seeded(method) else (None,)):
                converted[(kv, method, seed)] = path = stages.convert(mha, kv, method, seed, statistics)
                stages.evaluate(eval_key(kv, h, method, 0.0, seed), path)
    if s.conversion_only:
        for line in skipped_stages():
            log(line)
        return
    log("[5/8] uptraining")
    for seed in seeds:
        stages.uptrain_and_evaluate(mha, h, None, seed)
        for kv in (1, g):
            for method in s.methods_for(kv):
                stages.uptrain_and_evaluate(converted[(kv, method, seed if seeded(method) else None)], kv, method, seed)
    log("[6/8] WMT fine-tuning")
    for seed in seeds[:s.finetune_seeds]:
        for kv, method in s.finetuned():
            initial = converted[(kv, method, None)] if kv != h else mha
            checkpoint = stages.uptrain(initial, kv, method, seed)[s.ablation_alpha]
            stages.finetune(kv, method, seed, checkpoint)
    log("[7/8] time per sample")
    first = seeds[0]
    timed = {}
    for kv, method in ((h, None), (g, "mean"), (1, "mean")):
        initial = converted[(kv, method, None)] if kv != h else mha
        timed[variant(kv, h)] = stages.uptrain(initial, kv, method, first)[s.ablation_alpha]
    stages.time_decoding(timed)


def skipped_stages() -> list[str]:
    """The lines naming stages 5-7, which conversion-only settings (the quickstart) skip."""
    why = "skipped: conversion only (alpha = 0), as the quickstart's settings ask"
    return [f"[5/8] uptraining: {why}", f"[6/8] WMT fine-tuning: {why}", f"[7/8] time per sample: {why}"]


def seeded(method: str) -> bool:
    """True for methods whose conversion depends on the seed."""
    return method in SEEDED_METHODS
