"""One command for one accelerator chip: parity, the paper's time per sample, HF T5, training MFU.

    bash scripts/accelerator_check.sh OUT_DIR             # one GPU or TPU chip, within 10 minutes
    bash scripts/accelerator_check.sh OUT_DIR --dry_run   # tiny shapes on a CPU (the test suite runs it)

It needs what a plain JAX + PyTorch GPU image has (jax, flax, optax, orbax,
tensorstore, torch, transformers) plus gin-config, installable from a wheel
carried along; neither TensorFlow nor seqio (nothing here imports them).
Each step runs in its own process under its own time limit; its output is
kept in OUT_DIR/<step>.log and its numbers in OUT_DIR/<step>.json:

1. `parity`: a random T5.1.1 saved by HuggingFace, read by our checkpoint
   reader; our logits (JAX on the device) against HuggingFace's (PyTorch on
   the same device when it is a GPU), float32, highest matmul precision.
2. `paper`: `gqa-t5x bench --preset paper` (XXL, 24+24 layers, in 2048,
   out 512, batch 32, bfloat16 weights and activations) for MHA, GQA-8, MQA.
3. `huggingface`: HuggingFace T5 (bfloat16) on the same device at the
   paper step's shape and inputs, in a process of its own with JAX kept off
   the device (`gqa-t5x bench --preset paper --huggingface_alone`): the
   bench's process holds JAX's share of the device (75% by default) and
   our weights, which would leave an 80 GB chip too little for
   HuggingFace's 22 GB of weights and its caches. Its
   weights are HuggingFace's own random initialisation, made on the device
   in bfloat16 (time does not depend on the values; the greedy-token
   agreement of the two implementations is a CPU bench's check). The report
   sets its time per sample against each paper row's.
4. `train`: our train step's tokens/s and MFU (T5.1.1-large, bfloat16
   activations) for MHA / GQA-8 / MQA (`scripts/bench_train.py`).

The report (OUT_DIR/accelerator_check.md and .json) names the device and
says for every step: ok, failed (its last lines) or timed out, and whether a
step that timed out had already written its result (a process that did not
exit after finishing, as seen once with JAX and PyTorch on one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROG = [sys.executable, "-m", "gqa_t5x.cli"]

# (name, seconds, full command, dry-run command); "{out}" is the step's output prefix.
PAPER = ["bench", "--preset", "paper", "--output", "{out}"]
PAPER_DRY = ["bench", "--gin_file", "gin/models/t5_1_1/tiny.gin", "--num_kv_heads", "4,2,1", "--input_length", "16",
             "--output_length", "4", "--batch_size", "2", "--repeats", "1", "--no_huggingface", "--output", "{out}"]
HF = ["bench", "--preset", "paper", "--huggingface_alone", "--output", "{out}"]
HF_DRY = ["bench", "--huggingface_alone", "--gin_file", "gin/models/t5_1_1/tiny.gin", "--input_length", "16",
          "--output_length", "4", "--batch_size", "2", "--dtype", "float32", "--output", "{out}"]
TRAIN = ["--model", "large", "--no_huggingface", "--kv_heads", "16,8,1", "--batch", "32", "--inputs", "512",
         "--targets", "114", "--warmup", "1", "--steps", "4", "--dtype", "bfloat16", "--out", "{out}"]
TRAIN_DRY = ["--model", "tiny", "--no_huggingface", "--kv_heads", "4,1", "--batch", "2", "--inputs", "16",
             "--targets", "4", "--warmup", "1", "--steps", "2", "--out", "{out}"]
STEPS = [
    ("parity", 90, [sys.executable, __file__, "--parity", "{out}"], [sys.executable, __file__, "--parity", "{out}"]),
    ("paper", 240, [*PROG, *PAPER], [*PROG, *PAPER_DRY]),
    ("huggingface", 150, [*PROG, *HF], [*PROG, *HF_DRY]),
    ("train", 120, [sys.executable, str(REPO / "scripts" / "bench_train.py"), *TRAIN],
     [sys.executable, str(REPO / "scripts" / "bench_train.py"), *TRAIN_DRY]),
]


def parity(out: str) -> None:
    """Our logits against HuggingFace T5's, one random model, on this machine's device."""
    import tempfile

    import jax
    import numpy as np
    import torch
    import transformers

    jax.config.update("jax_default_matmul_precision", "highest")
    from gqa_t5x import checkpoints
    from gqa_t5x.model import network

    torch.manual_seed(0)
    hf_config = transformers.T5Config(vocab_size=512, d_model=256, d_kv=32, d_ff=512, num_layers=2,
                                      num_decoder_layers=2, num_heads=8, feed_forward_proj="gated-gelu",
                                      tie_word_embeddings=False, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config, params = checkpoints.load(tmp)
    model = model.to(device)
    rng = np.random.default_rng(0)
    enc = rng.integers(2, 512, (4, 32)).astype(np.int32)
    dec_target = rng.integers(2, 512, (4, 8)).astype(np.int32)
    dec_input = np.pad(dec_target[:, :-1], ((0, 0), (1, 0)))
    ours = np.asarray(network.Transformer(config.replace(dtype="float32", dropout_rate=0.0)).apply(
        {"params": params}, enc, dec_input, dec_target, enable_dropout=False), np.float64)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(enc.astype(np.int64)).to(device),
                       decoder_input_ids=torch.from_numpy(dec_input.astype(np.int64)).to(device)
                       ).logits.float().cpu().numpy().astype(np.float64)
    worst = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    result = {"jax_device": jax.devices()[0].device_kind, "torch_device": device,
              "max_relative_logit_difference": worst, "ok": worst < 1e-4}
    Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


def _run_step(name: str, seconds: int, command: list[str], output: Path) -> dict:
    prefix = str(output / name)
    command = [part.replace("{out}", prefix) for part in command]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    with open(output / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=seconds)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"timed out after {seconds} s"
    wall = round(time.monotonic() - start, 1)
    result_file = Path(prefix + ".json")
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    if status.startswith("timed out") and result is not None:
        status += " (its result was written: the process did not exit after finishing)"
    tail = (output / f"{name}.log").read_text().splitlines()[-8:]
    print(f"[accelerator_check] {name}: {status} in {wall} s", flush=True)
    return {"step": name, "limit_s": seconds, "wall_s": wall, "status": status, "result": result,
            "log_tail": tail if not status.startswith("ok") else []}


def _summary(step: dict) -> str:
    result = step["result"] or {}
    if step["step"] == "parity" and result:
        return f"max relative logit difference {result['max_relative_logit_difference']:.2e} ({result['torch_device']})"
    if step["step"] in ("paper", "huggingface") and result:
        rows = result.get("rows", [])
        parts = [f"{r['variant']} {r['time_per_sample_s']:.4f} s/sample, step {1e3 * r['decode_step_s']:.2f} ms "
                 f"({100 * r['decode_step_roofline_fraction']:.0f}% of roofline), batch {r['batch']}" for r in rows]
        parts += [f"HF {h['time_per_sample_s']:.4f} s/sample, step {1e3 * h['decode_step_s']:.2f} ms, batch {h['batch']}"
                  + (f" (encoder in micro-batches of {h['encoder_micro_batch']})"
                     if h.get("encoder_micro_batch", h["batch"]) != h["batch"] else "")
                  for h in result.get("huggingface", [])]
        return "; ".join(parts)
    if step["step"] == "train" and result:
        return "; ".join(f"{r['label']} {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.0f}%"
                         for r in result.get("results", []))
    return "-"


def _versus_huggingface(steps: list[dict]) -> list[str]:
    """The report's table of each paper row against HuggingFace's time per sample (target: 3x)."""
    results = {s["step"]: s["result"] or {} for s in steps}
    rows, hf = results["paper"].get("rows", []), results["huggingface"].get("huggingface", [])
    if not rows or not hf:
        return []
    hf = hf[0]
    lines = ["", f"Against HuggingFace T5 on the same device ({results['huggingface'].get('device')}, "
                 f"{hf['dtype']}, batch {hf['batch']}, its own process):", "",
             "| variant | ours s/sample (batch) | HF s/sample | HF / ours | at least 3x |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = hf["time_per_sample_s"] / r["time_per_sample_s"]
        lines.append(f"| {r['variant']} | {r['time_per_sample_s']:.4f} ({r['batch']}) | {hf['time_per_sample_s']:.4f} "
                     f"| {ratio:.2f}x | {'yes' if ratio >= 3 else 'no'} |")
    if any(r["batch"] != hf["batch"] for r in rows):
        lines += ["", "Ours ran a smaller batch than HuggingFace (see the paper step's batch_reason): "
                      "per-sample times at different batches are not a like-for-like comparison."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("output", nargs="?", help="Directory of the logs, results and report.")
    parser.add_argument("--dry_run", action="store_true", help="Tiny shapes, for a CPU (the test suite).")
    parser.add_argument("--parity", metavar="PREFIX", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parity:
        parity(args.parity)
        return 0
    if not args.output:
        parser.error("OUTPUT is required.")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    steps = [_run_step(name, limit, dry if args.dry_run else full, output) for name, limit, full, dry in STEPS]
    import jax

    device = jax.devices()[0]
    report = {"device": f"{device.platform}: {device.device_kind}", "dry_run": args.dry_run,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps}
    (output / "accelerator_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Accelerator check ({'dry run, tiny shapes' if args.dry_run else 'full'})", "",
             f"Device: {report['device']}; {report['date']}."
             + (" No accelerator: these numbers come from a CPU and say nothing of one." if device.platform == "cpu"
                else ""), "", "| step | status | wall s (limit) | result |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['wall_s']} ({s['limit_s']}) | {_summary(s)} |" for s in steps]
    lines += _versus_huggingface(steps)
    for s in steps:
        if s["log_tail"]:
            lines += ["", f"`{s['step']}` ended with:", "", "```", *s["log_tail"], "```"]
    (output / "accelerator_check.md").write_text("\n".join(lines) + "\n")
    print(f"Wrote {output / 'accelerator_check.md'}", flush=True)
    return 0 if all(s["status"] == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
