"""Helpers for the training tests: a synthetic seqio task and a tiny model.

The synthetic task `gqa_test_synthetic` is deterministic given its seed: a
fixed pool of random token sequences (vocabulary 128, no tokenizer), shuffled
by seqio with the dataset seed, so a resumed run and an uninterrupted run can
be compared exactly. The env variable `GQA_TEST_SLOW_EXAMPLE_S` delays every
example of the stream, `GQA_TEST_SLOW_BATCH_S` every batch read from a
data cache (`slow_down_cache_batches`) and `GQA_TEST_SLOW_STEP_S` every
training step (`slow_down_steps`), so a test can kill a run mid-way.
`GQA_TEST_SIGNAL_AT` makes the run signal itself at a known point
(`signal_self_at`): during a step or during a checkpoint write.

Run as a script, it trains (see `main`) and writes the final parameters'
checksums and the loss trajectory as JSON; the preemption and sharding tests
start it in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TASK = "gqa_test_synthetic"
VOCAB = 128
POOL = 64


def tiny_config(num_kv_heads: int | None = None, dropout_rate: float = 0.0, vocab_size: int = VOCAB):
    """A 2+2-layer model small enough for CPU tests (4 heads of 4)."""
    from gqa_t5x.model import network

    return network.T5Config(
        vocab_size=vocab_size, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32,
        num_encoder_layers=2, num_decoder_layers=2, dropout_rate=dropout_rate,
        dtype="float32", num_kv_heads=num_kv_heads,
    )


def register_synthetic_task() -> None:
    """Registers `gqa_test_synthetic` (idempotent)."""
    import seqio
    import tensorflow as tf

    seqio.TaskRegistry.remove(TASK)
    rng = np.random.RandomState(1234)
    lengths_in = rng.randint(4, 24, size=POOL)
    lengths_out = rng.randint(2, 8, size=POOL)
    inputs = [rng.randint(2, VOCAB, size=n).astype(np.int32) for n in lengths_in]
    targets = [rng.randint(2, VOCAB, size=n).astype(np.int32) for n in lengths_out]
    slow = float(os.environ.get("GQA_TEST_SLOW_EXAMPLE_S", "0"))

    def generate():
        for x, y in zip(inputs, targets):
            if slow:
                time.sleep(slow)
            yield {"inputs": x, "targets": y}

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_generator(
            generate,
            output_signature={
                "inputs": tf.TensorSpec([None], tf.int32),
                "targets": tf.TensorSpec([None], tf.int32),
            },
        )

    vocab = seqio.PassThroughVocabulary(VOCAB, eos_id=1)
    seqio.TaskRegistry.add(
        TASK,
        source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
        output_features={
            "inputs": seqio.Feature(vocab, add_eos=True),
            "targets": seqio.Feature(vocab, add_eos=True),
        },
    )


def dataset_config(batch_size: int = 8, pack: bool = True, seed: int = 7,
                   cache_dir: str | None = None):
    from gqa_t5x.data import datasets

    return datasets.DatasetConfig(
        TASK, {"inputs": 32, "targets": 8}, "train", batch_size,
        shuffle=True, seed=seed, pack=pack, module=None, cache_dir=cache_dir,
    )


def slow_down_cache_batches(seconds: float) -> None:
    """Makes every batch read from a data cache take `seconds` longer."""
    from gqa_t5x.data import cache_reader

    read = cache_reader.host_batches

    def slowed(*args, **kwargs):
        for batch in read(*args, **kwargs):
            time.sleep(seconds)
            yield batch

    cache_reader.host_batches = slowed


def slow_down_steps(seconds: float) -> None:
    """Makes every training step of this process take at least `seconds` longer (before the
    step's batch is placed), whatever the data pipeline has read ahead."""
    from gqa_t5x.training import partitioning

    to_global = partitioning.Partitioner.host_local_to_global

    def slowed(self, *args, **kwargs):
        time.sleep(seconds)
        return to_global(self, *args, **kwargs)

    partitioning.Partitioner.host_local_to_global = slowed


def signal_self_at(spec: str) -> None:
    """Makes this training process send itself signals at known points.

    Args:
      spec: 'step:N' (SIGTERM while the N-th step of this process runs),
        'save:N' (SIGTERM while the checkpoint of step N is being written,
        after its asynchronous write has started), 'twice:N' (SIGTERM during
        step N, then a second SIGTERM during the preemption save that
        follows), or 'sigint:N' (SIGINT during step N).
    """
    import signal

    from gqa_t5x.training import partitioning
    from gqa_t5x.training import train_state

    kind, at = spec.split(":")
    at = int(at)
    signum = signal.SIGINT if kind == "sigint" else signal.SIGTERM
    to_global = partitioning.Partitioner.host_local_to_global
    save = train_state.save
    calls = {"steps": 0, "saves_signalled": 0}

    def host_local_to_global(self, *args, **kwargs):
        calls["steps"] += 1
        if kind != "save" and calls["steps"] == at:
            os.kill(os.getpid(), signum)
        return to_global(self, *args, **kwargs)

    def saving(manager, state, *args, **kwargs):
        saved = save(manager, state, *args, **kwargs)
        step = int(state.step)
        due = (kind == "save" and step == at) or (kind == "twice" and calls["steps"] >= at)
        if due and not calls["saves_signalled"]:
            calls["saves_signalled"] += 1
            os.kill(os.getpid(), signal.SIGTERM)  # The write is still in flight.
        return saved

    partitioning.Partitioner.host_local_to_global = host_local_to_global
    train_state.save = saving


def read_checkpoint_params(path: str) -> dict[str, np.ndarray]:
    """{T5X path: float32 array} of a training checkpoint (via the checkpoints package)."""
    from gqa_t5x import checkpoints

    with checkpoints.open_checkpoint(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


def params_digest(flat: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of every parameter's bytes (bit-exact comparison)."""
    import hashlib

    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in sorted(flat.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint_period", type=int, default=2)
    parser.add_argument("--num_kv_heads", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--runs", default="",
        help="'kv_heads:data,model;...' one training run each ('' = one run on 1 device "
        "with --num_kv_heads); each run gets its own MODEL_DIR/<kv>_<data>x<model>.",
    )
    parser.add_argument("--cache_dir", default=None,
                        help="Train from this data cache of the task (default: stream).")
    parser.add_argument("--inf_lr_from_step", type=int, default=None,
                        help="Learning rate becomes inf from this global step (NaN test).")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from gqa_t5x.model import models
    from gqa_t5x.model import network
    from gqa_t5x.training import optimizers
    from gqa_t5x.training import partitioning
    from gqa_t5x.training import trainer

    learning_rate_fn = optimizers.constant_schedule(0.01)
    if args.inf_lr_from_step is not None:
        def learning_rate_fn(step):
            return jnp.where(step >= args.inf_lr_from_step, jnp.inf, 0.01)

    from gqa_t5x import errors

    register_synthetic_task()
    if os.environ.get("GQA_TEST_SIGNAL_AT"):
        signal_self_at(os.environ["GQA_TEST_SIGNAL_AT"])
    if os.environ.get("GQA_TEST_SLOW_BATCH_S"):
        slow_down_cache_batches(float(os.environ["GQA_TEST_SLOW_BATCH_S"]))
    if os.environ.get("GQA_TEST_SLOW_STEP_S"):
        slow_down_steps(float(os.environ["GQA_TEST_SLOW_STEP_S"]))
    result: dict = {"runs": {}}
    runs = [r for r in args.runs.split(";") if r]
    for run in runs or [f"{args.num_kv_heads or 0}:1,1"]:
        kv, mesh = run.split(":")
        data, model_shards = (int(v) for v in mesh.split(","))
        config = tiny_config(int(kv) or None, args.dropout)
        model = models.EncoderDecoderModel(network.Transformer(config))
        devices = jax.devices()[: data * model_shards]
        partitioner = partitioning.Partitioner(num_partitions=model_shards, devices=devices)
        model_dir = (
            os.path.join(args.model_dir, f"{kv}_{data}x{model_shards}") if runs else args.model_dir
        )
        try:
            summary = trainer.train(
                model=model, train_dataset_cfg=dataset_config(cache_dir=args.cache_dir),
                model_dir=model_dir,
                total_steps=args.steps, learning_rate_fn=learning_rate_fn,
                partitioner=partitioner, checkpoint_period=args.checkpoint_period,
                keep_checkpoints=None, log_every=1, progress=True, random_seed=3,
            )
        except errors.Preempted as stopped:
            print(f"training_utils: stopped: {stopped}", file=sys.stderr, flush=True)
            return errors.exit_status(stopped)
        params = read_checkpoint_params(os.path.join(model_dir, f"checkpoint_{summary.end_step}"))
        abstract = jax.eval_shape(model.get_initial_params, jax.random.PRNGKey(0))
        specs = partitioner.param_specs(abstract, model.config)
        result["runs"][run] = {
            "losses": summary.losses,
            "start_step": summary.start_step,
            "end_step": summary.end_step,
            "digest": params_digest(params),
            "specs": {k: list(v) for k, v in _flat_specs(specs).items()},
            "replicated": list(partitioner.replicated_params),
        }
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def _flat_specs(specs) -> dict:
    import jax
    from jax.sharding import PartitionSpec

    from gqa_t5x.model import param_tree

    leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return {param_tree.keypath_str(p): tuple(s) for p, s in leaves}


if __name__ == "__main__":
    sys.exit(main())
