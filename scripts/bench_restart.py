"""Restart latency: process start -> first new step, streaming vs the data cache.

    python scripts/bench_restart.py                  # writes docs/bench_restart.{json,md}
    python scripts/bench_restart.py --steps 10,2000 --repeats 2

A tiny GQA-2 T5.1.1 uptrains on the shared C4 sample
(`configs/uptrain_c4_sample.gin`: 128 + 32 tokens, packed, batch 8) from a
step-0 checkpoint, reading a data cache written once with `gqa-t5x cache`,
and checkpoints at each step of `--steps`. Then, for each such checkpoint,
the same command restarts the run for ONE more step, twice over:

* before: DATA_CACHE_DIR=None, the streaming pipeline (what every restart
  did before the cache): seqio re-reads, re-tokenizes, re-corrupts and
  re-packs every row consumed so far, then skips them;
* after: DATA_CACHE_DIR set: the run opens the cache at the checkpoint's row.

Each restart is `python -m gqa_t5x.main` in a fresh process on a fresh copy
of MODEL_DIR, timed from `Popen` to the progress line of its first step
(LOG_EVERY=1), and to its `[data]` line (restored, data opened). Both
restarts pay the same start-up, restore and compilation; the difference is
the data. `--repeats` restarts of each kind, the fastest reported (the CPUs
of this machine are shared; all runs are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GQA_T5X_SHARED", REPO.parent / "shared"))
TINY = "gin/models/t5_1_1/tiny.gin"


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _flags(initial: Path, cache_dir: Path | None) -> list[str]:
    cache_value = f"'{cache_dir}'" if cache_dir else "None"
    return [
        f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin",
        "--gin_file=configs/uptrain_c4_sample.gin",
        f"--gin.VOCAB_PATH='{SHARED / 'fixtures/t5_vocab/cc_all.32000.sentencepiece.model'}'",
        f"--gin.C4_DIR='{SHARED / 'data/c4/en/3.0.1'}'",
        "--gin.NUM_KV_HEADS=2", f"--gin.INITIAL_CHECKPOINT_PATH='{initial}'",
        f"--gin.DATA_CACHE_DIR={cache_value}", "--gin.KEEP_CHECKPOINTS=None",
    ]


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... failed:\n{proc.stderr[-3000:]}")


def prepare(work: Path, steps: list[int]) -> tuple[Path, Path]:
    """A step-0 GQA-2 tiny checkpoint, the cache, and a run checkpointed at `steps`."""
    code = (
        "from gqa_t5x import checkpoints, gin_config, conversion\n"
        "from gqa_t5x.model import initialization\n"
        f"cfg = gin_config.model_config_from_gin('{TINY}').replace(dtype='float32')\n"
        f"checkpoints.save('{work}/mha/checkpoint_0', cfg, initialization.init_params(cfg, seed=0), step=0)\n"
        f"conversion.convert_checkpoint('{work}/mha/checkpoint_0', '{work}/gqa/checkpoint_0', 2,"
        " progress=False)\n"
    )
    _run([sys.executable, "-c", code])
    initial, cache_dir = work / "gqa" / "checkpoint_0", work / "cache"
    _run([sys.executable, "-m", "gqa_t5x.cli", "cache", *_flags(initial, cache_dir)])
    model_dir = work / "run"
    previous = 0
    for step in steps:  # Checkpoint exactly at each step of `steps`.
        _run([sys.executable, "-m", "gqa_t5x.main", *_flags(initial, cache_dir),
              f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={step}",
              f"--gin.CHECKPOINT_PERIOD={step - previous}", "--gin.LOG_EVERY=1000"])
        previous = step
    return initial, cache_dir


def restart(work: Path, initial: Path, cache_dir: Path | None, step: int) -> dict[str, float]:
    """Seconds from process start to the `[data]` line and to the first new step."""
    model_dir = work / f"restart_{step}_{'cache' if cache_dir else 'stream'}"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir()
    shutil.copytree(work / "run" / f"checkpoint_{step}", model_dir / f"checkpoint_{step}")
    args = [sys.executable, "-m", "gqa_t5x.main", *_flags(initial, cache_dir),
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={step + 1}", "--gin.LOG_EVERY=1"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    times: dict[str, float] = {}
    for line in proc.stdout:
        if line.startswith("[data]") and "data_s" not in times:
            times["data_s"] = time.perf_counter() - start
        if line.startswith(f"[train] step {step + 1}/"):
            times["first_step_s"] = time.perf_counter() - start
    if proc.wait() != 0 or "first_step_s" not in times:
        raise RuntimeError(f"the restart at step {step} failed (exit {proc.returncode}).")
    shutil.rmtree(model_dir)
    return times


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(results: dict, output: Path) -> None:
    """Writes OUTPUT.json and OUTPUT.md."""
    output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "# Restart latency: streaming (before) vs the data cache (after)",
        "",
        f"`python scripts/bench_restart.py --steps {','.join(map(str, results['steps']))} "
        f"--repeats {results['repeats']}`: tiny T5.1.1 GQA-2 uptraining on the shared C4 "
        "sample (128 + 32 tokens, packed, batch 8), restarted from its checkpoint at each "
        "step for one more step in a fresh process. Fastest of the repeats; "
        f"machine: {results['cpus']} CPUs ({results['cpu_model']}), 1-min load average "
        f"{results['load_average']:.1f} at the end (the CPUs are shared).",
        "",
        "| restart at step | rows consumed | before: stream, first step | before: data ready "
        "| after: cache, first step | after: data ready |",
        "|---|---|---|---|---|---|",
    ]
    for step in results["steps"]:
        row = results["runs"][str(step)]
        best = {kind: min(row[kind], key=lambda t: t["first_step_s"]) for kind in ("stream", "cache")}
        lines.append(
            f"| {step} | {step * results['batch_size']} | {best['stream']['first_step_s']:.1f} s "
            f"| {best['stream']['data_s']:.1f} s | {best['cache']['first_step_s']:.1f} s "
            f"| {best['cache']['data_s']:.1f} s |"
        )
    lines += [
        "",
        "'first step' is process start -> the progress line of the first new step (imports, "
        "restore, data, compilation, one step); 'data ready' is process start -> the "
        "trainer's `[data]` line (checkpoint restored, data pipeline opened; the stream's "
        "skip itself runs when the first batch is pulled, so its cost shows in 'first step').",
    ]
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,2000", help="Checkpoint steps to restart from.")
    parser.add_argument("--repeats", type=int, default=2, help="Restarts of each kind per step.")
    parser.add_argument("--output", default=str(REPO / "docs" / "bench_restart"),
                        help="Report prefix (writes PREFIX.json and PREFIX.md).")
    parser.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one).")
    args = parser.parse_args(argv)
    steps = sorted(int(s) for s in args.steps.split(","))
    if steps[0] <= 0 or args.repeats < 1:
        raise SystemExit("--steps must be positive and --repeats >= 1.")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_restart_"))
    work.mkdir(parents=True, exist_ok=True)
    initial, cache_dir = prepare(work, steps)
    runs: dict[str, dict[str, list]] = {}
    for step in steps:
        runs[str(step)] = {"stream": [], "cache": []}
        for _ in range(args.repeats):
            for kind, where in (("stream", None), ("cache", cache_dir)):
                times = restart(work, initial, where, step)
                runs[str(step)][kind].append(times)
                print(f"step {step} {kind}: data ready {times['data_s']:.1f} s, "
                      f"first step {times['first_step_s']:.1f} s", flush=True)
    results = {
        "steps": steps, "repeats": args.repeats, "batch_size": 8, "runs": runs,
        "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "load_average": os.getloadavg()[0],
    }
    write_report(results, Path(args.output))
    print(Path(args.output).with_suffix(".md").read_text())
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
