"""Training throughput: ours (MHA / GQA / MQA) against HuggingFace T5 in PyTorch, and our MFU.

    python scripts/bench_train.py                          # T5.1.1-small, writes docs/bench_train.{json,md}
    python scripts/bench_train.py --model base --out docs/bench_train_base
    python scripts/bench_train.py --kv_heads 6,3,2,1 --batch 8 --inputs 512 --targets 114

Each configuration runs in its own subprocess (so peak RSS is its own), on a
fixed random batch of full-length rows (what packing produces), `--warmup`
untimed steps then `--steps` timed ones; the fastest is reported (this
machine's CPUs are shared; the median is in the JSON):

* ours: the trainer's train step (`train_step.make_train_step`: forward,
  backward, T5 Adafactor, rsqrt learning rate), jit-compiled for one device;
* HuggingFace: `transformers.T5ForConditionalGeneration` with the same
  T5.1.1 config (gated-gelu, untied logits, no dropout), float32, PyTorch
  eager on all cores, `labels=` loss, backward and
  `transformers.optimization.Adafactor` (relative step, parameter scaling:
  T5's Adafactor), the peer a user would otherwise train with. HuggingFace
  has no grouped key/value heads, so it runs MHA only.

Reported: tokens/s (input + target positions), steps/s, our model FLOPs
utilisation (3x the forward matmul FLOPs of `roofline.train_step_flops` per
second, over the float32 matmul peak measured here), compile time, XLA's
memory analysis of our compiled step and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = {
    "small": dict(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8, head_dim=64, mlp_dim=1024),
    "base": dict(emb_dim=768, num_heads=12, num_encoder_layers=12, num_decoder_layers=12, head_dim=64, mlp_dim=2048),
    "large": dict(emb_dim=1024, num_heads=16, num_encoder_layers=24, num_decoder_layers=24, head_dim=64,
                  mlp_dim=2816),
    # For dry runs of scripts/accelerator_check.py on a CPU.
    "tiny": dict(emb_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, head_dim=8, mlp_dim=64),
}
HUGGINGFACE = 0  # --child value of the HuggingFace run


def _label(kv: int, heads: int) -> str:
    if kv == HUGGINGFACE:
        return "HuggingFace T5 (PyTorch, MHA)"
    if kv == heads:
        return f"ours MHA ({heads} kv heads)"
    if kv == 1:
        return "ours MQA (1 kv head)"
    return f"ours GQA-{kv}"


def _batch(args: argparse.Namespace):
    import numpy as np

    rng = np.random.RandomState(0)
    targets = rng.randint(2, 32000, size=(args.batch, args.targets)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.randint(2, 32000, size=(args.batch, args.inputs)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((args.batch, 1), np.int32), targets[:, :-1]], 1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones_like(targets, np.float32),
    }


def _timed_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def child_ours(args: argparse.Namespace) -> dict:
    """Benchmarks our train step for one kv-head count in this process."""
    import jax
    import jax.numpy as jnp

    from gqa_t5x.model import models
    from gqa_t5x.model import network
    from gqa_t5x.training import optimizers
    from gqa_t5x.training import train_state as ts
    from gqa_t5x.training.train_step import make_train_step  # not `trainer`: no TensorFlow (clu, seqio) here

    shape = MODELS[args.model]
    config = network.T5Config(**shape, dtype=args.dtype, dropout_rate=0.0,
                              num_kv_heads=args.child if args.child != shape["num_heads"] else None)
    model = models.EncoderDecoderModel(network.Transformer(config))
    optimizer = optimizers.adafactor()
    params = jax.jit(model.get_initial_params)(jax.random.PRNGKey(0))
    state = ts.TrainState(step=jnp.asarray(1_000_000, jnp.int32), params=params,
                          opt_state=jax.jit(optimizer.init)(params))
    batch = _batch(args)
    step_fn = jax.jit(
        make_train_step(model, optimizer, optimizers.rsqrt_schedule(), jax.random.PRNGKey(1)),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    xla_bytes = None
    if memory is not None:
        xla_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    holder = {"state": state}

    def step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], holder["metrics"]))

    times = _timed_steps(step, args.warmup, args.steps)
    metrics = holder["metrics"]
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(holder["state"].params))
    return {"compile_s": compile_s, "times": times, "params": n_params, "xla_step_bytes": xla_bytes,
            "final_loss_per_token": float(metrics["loss_sum"]) / float(metrics["num_tokens"])}


def child_huggingface(args: argparse.Namespace) -> dict:
    """Benchmarks HuggingFace T5's training step (PyTorch eager) in this process."""
    import torch
    import transformers

    shape = MODELS[args.model]
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=32128, d_model=shape["emb_dim"], d_kv=shape["head_dim"], d_ff=shape["mlp_dim"],
        num_layers=shape["num_encoder_layers"], num_decoder_layers=shape["num_decoder_layers"],
        num_heads=shape["num_heads"], feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=False, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    hf_config.tie_word_embeddings = False  # T5.1.1 (transformers 5 sets True whatever the argument)
    model = transformers.T5ForConditionalGeneration(hf_config).train()
    # One embedding table shared by encoder and decoder (T5.1.1), separate logits kernel.
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    optimizer = transformers.optimization.Adafactor(
        model.parameters(), lr=None, scale_parameter=True, relative_step=True, warmup_init=False)
    batch = {k: torch.from_numpy(v.astype("int64")) for k, v in _batch(args).items() if k != "decoder_loss_weights"}
    holder = {}

    def step():
        out = model(input_ids=batch["encoder_input_tokens"], decoder_input_ids=batch["decoder_input_tokens"],
                    labels=batch["decoder_target_tokens"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        holder["loss"] = float(out.loss)

    times = _timed_steps(step, args.warmup, args.steps)
    return {"compile_s": 0.0, "times": times, "params": sum(p.numel() for p in model.parameters()),
            "xla_step_bytes": None, "final_loss_per_token": holder["loss"],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


def child(args: argparse.Namespace) -> dict:
    """One configuration's measurements (runs in a subprocess)."""
    import numpy as np

    result = child_huggingface(args) if args.child == HUGGINGFACE else child_ours(args)
    times = result.pop("times")
    step_s = float(np.min(times))  # the CPUs are shared: the fastest step is the least disturbed
    tokens = args.batch * (args.inputs + args.targets)
    return {
        "kv_heads": args.child, "label": _label(args.child, MODELS[args.model]["num_heads"]),
        "step_s_min": step_s, "step_s_median": float(np.median(times)), "steps_per_s": 1.0 / step_s,
        "tokens_per_s": tokens / step_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **result,
    }


def _machine(dtype: str = "float32") -> dict:
    """CPU model, cores, the device, and the matmul peak in the run's dtype (for MFU)."""
    import jax

    from gqa_t5x.experiments import machine
    from gqa_t5x.experiments import roofline

    info = machine.describe()
    device = jax.devices()[0]
    return {"cpu": info["cpu"], "cores": info["cores"], "jax": info["jax"], "device": device.device_kind,
            "matmul_dtype": dtype, "matmul_peak_gflops": roofline.measure_matmul_peak(dtype=dtype),
            "published": roofline.published_peaks(device.device_kind)}


def write_report(results: list[dict], meta: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    hf = next((r for r in results if r["kv_heads"] == HUGGINGFACE), None)
    rows = [
        "| run | params | tokens/s | vs HF | step s (min / median) | MFU | compile s | XLA step memory | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        xla = f"{r['xla_step_bytes'] / 2**20:.0f} MiB" if r["xla_step_bytes"] else "-"
        versus = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        rows.append(
            f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | {versus} | "
            f"{r['step_s_min']:.3f} / {r['step_s_median']:.3f} | {100 * r['mfu']:.0f}% | "
            f"{r['compile_s']:.1f} | {xla} | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    text = [
        f"# Training throughput: ours vs HuggingFace T5 ({meta['model']}, CPU)",
        "",
        f"`{meta['command']}`: {meta['shape']}; batch {meta['batch']} x ({meta['inputs']} inputs + "
        f"{meta['targets']} targets) full rows, float32, fastest of {meta['steps']} steps after "
        f"{meta['warmup']} warm-up. {meta['cpu']}, {meta['cores']} cores; 1-minute load average "
        f"{meta['load_average_start']} at start, {meta['load_average_end']} at end.",
        "",
        *rows,
        "",
        f"Ours: the trainer's jit-compiled step (T5 Adafactor via optax, rsqrt schedule, z-loss). "
        f"HuggingFace: `T5ForConditionalGeneration` (transformers {meta.get('transformers', '?')}, "
        f"torch {meta.get('torch', '?')}, {meta.get('torch_threads', '?')} threads), `labels=` loss, "
        "backward, `transformers.optimization.Adafactor` (relative step, parameter scaling). "
        f"MFU: {meta['train_step_gflop']:.1f} GFLOP per step (3x the forward matmul FLOPs, "
        "`roofline.train_step_flops`) per second over the float32 matmul peak measured here "
        f"({meta['matmul_peak_gflops']} GFLOP/s). tokens/s counts input + target positions.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=sorted(MODELS))
    parser.add_argument("--kv_heads", default=None, help="Comma-separated kv head counts (default: MHA, 2, 1).")
    parser.add_argument("--no_huggingface", action="store_true", help="Skip the HuggingFace run.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="Activation dtype of our step (bfloat16 on accelerators); MFU is against the "
                        "matmul peak measured in it. Parameters and Adafactor stay float32.")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_train"), help="Report prefix (.json/.md).")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    heads = MODELS[args.model]["num_heads"]
    kv_heads = [int(k) for k in args.kv_heads.split(",")] if args.kv_heads else [heads, 2, 1]
    from gqa_t5x.model.config import check_kv_heads

    for kv in kv_heads:
        try:
            check_kv_heads(heads, kv, name="--kv_heads", hint=f" (T5.1.1-{args.model})")
        except ValueError as error:
            raise SystemExit(str(error)) from None
    runs = ([] if args.no_huggingface else [HUGGINGFACE]) + kv_heads
    load_start = os.getloadavg()[0]
    machine = _machine(args.dtype)
    from gqa_t5x.experiments import roofline
    from gqa_t5x.model.config import T5Config

    flops = roofline.train_step_flops(T5Config(**MODELS[args.model]), args.batch, args.inputs, args.targets)
    results, meta_extra = [], {}
    for kv in runs:
        cmd = [sys.executable, __file__, f"--child={kv}", f"--model={args.model}", f"--batch={args.batch}",
               f"--inputs={args.inputs}", f"--targets={args.targets}", f"--warmup={args.warmup}",
               f"--steps={args.steps}", f"--dtype={args.dtype}"]
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"{_label(kv, heads)} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["mfu"] = flops / result["step_s_min"] / (machine["matmul_peak_gflops"] * 1e9)
        for key in ("torch", "transformers", "torch_threads"):
            if key in result:
                meta_extra[key] = result.pop(key)
        results.append(result)
        print(f"{result['label']:>32}: {result['tokens_per_s']:8.0f} tokens/s  step {result['step_s_min']:.3f} s  "
              f"MFU {100 * result['mfu']:.0f}%  compile {result['compile_s']:.1f}s  "
              f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    meta = {
        "model": f"T5.1.1-{args.model}", "shape": ", ".join(f"{k}={v}" for k, v in MODELS[args.model].items()),
        "batch": args.batch, "inputs": args.inputs, "targets": args.targets, "warmup": args.warmup,
        "dtype": args.dtype,
        "steps": args.steps, **machine, "platform": platform.machine(),
        "load_average_start": round(load_start, 2), "load_average_end": round(os.getloadavg()[0], 2),
        "train_step_gflop": flops / 1e9, "command": " ".join(["python scripts/bench_train.py", *sys.argv[1:]]),
        **meta_extra,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(results, meta, out)
    print(f"Wrote {out}.md and {out}.json.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
