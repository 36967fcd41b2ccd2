"""The train step: forward, backward, Adafactor update (T5X `train_step`).

Kept apart from the loop (`trainer.py`, which reads data through seqio and
writes TensorBoard summaries through TensorFlow) so that the step, like the
model and the decoding step, imports neither TensorFlow nor seqio: a GPU or
TPU image without them can run it, and TensorFlow never sees the
accelerators (`tests/training/test_train_step.py` blocks both imports).
"""

from __future__ import annotations

import jax
import optax

from gqa_t5x.model import models
from gqa_t5x.training import optimizers
from gqa_t5x.training import train_state as ts


def make_train_step(
    model: models.EncoderDecoderModel,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: optimizers.Schedule,
    dropout_key: jax.Array,
):
    """The (un-jitted) train step `(state, batch) -> (state, metrics)`.

    Args:
      model: Provides `loss_fn`.
      optimizer: Optax transformation without learning rate.
      learning_rate_fn: Schedule of the global step.
      dropout_key: Base PRNG key; step `s` uses `fold_in(dropout_key, s)`, so
        a resumed run draws the same dropout masks.

    Returns:
      The step function; metrics are summed loss terms, `loss`,
      `learning_rate`, `grad_norm` and `param_norm`.
    """

    def train_step(state: ts.TrainState, batch: dict[str, jax.Array]):
        step_rng = jax.random.fold_in(dropout_key, state.step)
        grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        learning_rate = learning_rate_fn(state.step)
        updates = optimizers.scale_updates(updates, learning_rate)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            metrics, loss=loss, learning_rate=learning_rate,
            grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
        )
        return ts.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
