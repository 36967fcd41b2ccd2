"""Hand-made evaluation files for the reproduction study's analysis.

`Evals` reads OUTPUT/evals/<key>.npz holding, per held-out set, per-example
sums: `<set>/loss` (summed token loss), `<set>/correct` (correct tokens) and
`<set>/tokens` (target tokens). These helpers write such files with a known
loss per token, so that every mean, difference and interval the analysis
computes can be worked out by hand:

* `write` with a number: the same loss per token on every example: every
  bootstrap resample gives exactly that value, so an interval over examples
  (or articles) is a point, and a seeded configuration's interval is
  Student-t over its seeds alone.
* `write` with an array: a given loss per token for each example (for
  paired differences that hold on every example while the examples differ).
* `write_finetuned`: the C4-fine-tuned alpha-0 models of claim C3b
  (`ft_<alpha-0 key>_s<seed>`, `Analysis.finetuned_keys`).
* `write_articles`: OUTPUT/data/heldout_<set>.npz with the `article` of
  each held-out example, so that the intervals resample whole articles.
* `write_study`: all of it for a dict of configurations' scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gqa_t5x.experiments.study.settings import (
    REPLAY,
    REPLAY_FRESH,
    SEEDED_METHODS,
    StudySettings,
    eval_key,
    split_label,
)

# Student-t quantiles t_{0.975, df} from printed tables (not scipy).
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 7: 2.3646243, 9: 2.2621572}


def tokens_for(n: int) -> np.ndarray:
    """Target tokens of n examples: 4, 5, ..., 12, 4, 5, ... (fixed, so examples pair)."""
    return (4 + np.arange(n) % 9).astype(np.float64)


def write(root: Path, key: str, settings: StudySettings, loss_per_token, accuracy: float = 0.5,
          sets: Sequence[str] | None = None) -> None:
    """OUTPUT/evals/<key>.npz for every held-out set of `settings`.

    Args:
      root: OUTPUT/evals.
      key: The evaluation key (`eval_key`).
      settings: Gives the held-out sets and their sizes.
      loss_per_token: A number (every example) or one number per example
        (a longer array gives the smaller sets its first entries).
      accuracy: Correct tokens / tokens on every example.
      sets: Only these held-out sets (None: all of `settings`).
    """
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, n in settings.heldout_examples:
        if sets is not None and name not in sets:
            continue
        tokens = tokens_for(n)
        value = np.asarray(loss_per_token, np.float64)
        per_token = np.broadcast_to(value, (n,)) if value.ndim == 0 else value[:n]
        assert per_token.shape == (n,), (key, name, value.shape)
        arrays |= {f"{name}/loss": per_token * tokens, f"{name}/correct": accuracy * tokens,
                   f"{name}/tokens": tokens}
    np.savez(root / f"{key}.npz", **arrays)


def write_config(root: Path, settings: StudySettings, kv: int, method: str | None, alpha: float,
                 seeds: Sequence[int], values) -> None:
    """The evaluations of one configuration: one file, or one per seed.

    `values` is the loss per token: for a single-run configuration a number
    (or per-example array); for a seeded one a list with one number per seed.
    """
    h = settings.num_heads
    single = alpha == 0 and (kv == h or split_label(method)[0] not in SEEDED_METHODS)
    if single:
        write(root, eval_key(kv, h, method, 0.0, None), settings, values)
        return
    assert len(values) == len(seeds), (kv, method, alpha)
    for seed, value in zip(seeds, values):
        write(root, eval_key(kv, h, method, alpha, seed), settings, value)


def finetuned_key(settings: StudySettings, kv: int, seed: int) -> str:
    """The key of a C4-fine-tuned alpha-0 model: ft_<alpha-0 key of MHA or mean pooling>_s<seed>."""
    h = settings.num_heads
    return f"ft_{eval_key(kv, h, None if kv == h else 'mean', 0.0, None)}_s{seed}"


def write_finetuned(root: Path, settings: StudySettings, kv: int, seeds: Sequence[int], values) -> None:
    """The C4-fine-tuned alpha-0 models of a variant, one file per seed (values: one loss per token per seed).

    As `Stages.finetune_c4` does, only the C4 held-out set is scored.
    """
    assert len(values) == len(seeds), kv
    for seed, value in zip(seeds, values):
        write(root, finetuned_key(settings, kv, seed), settings, value, sets=("c4",))


def write_articles(output: Path, settings: StudySettings, examples_per_article: int | dict[str, Sequence[int]]) -> None:
    """OUTPUT/data/heldout_<set>.npz with the source article of each held-out example.

    Args:
      output: OUTPUT of the study.
      settings: Gives the held-out sets and their sizes.
      examples_per_article: k (examples 0..k-1 are article 0, k..2k-1 article
        1, ...), or per set an explicit [n] array of article ids.
    """
    data = output / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n in settings.heldout_examples:
        if isinstance(examples_per_article, int):
            article = np.arange(n) // examples_per_article
        else:
            article = np.asarray(examples_per_article[name])
        assert article.shape == (n,), (name, article.shape)
        np.savez(data / f"heldout_{name}.npz", article=article.astype(np.int32))


def config_seeds(settings: StudySettings, kv: int, method: str | None, seeds: Sequence[int]) -> tuple[int, ...]:
    """The seeds a configuration ran with: `random` more (`seeds_of`), the MHA replays the first only."""
    if kv == settings.num_heads:
        return tuple(seeds[:1]) if method in (REPLAY, REPLAY_FRESH) else tuple(seeds)
    return settings.seeds_of(method, seeds)


def write_study(output: Path, settings: StudySettings, seeds: Sequence[int], scores: dict, *,
                finetuned: dict[int, Sequence[float]] | None = None, times: dict[str, list[float]] | None = None,
                articles: int | None = None) -> None:
    """A whole study's evaluations (and timing, and article clusters).

    Args:
      output: OUTPUT.
      settings: The study's settings.
      seeds: The study's seeds.
      scores: {(kv, method, alpha): loss per token} (the MHA 'fresh' recipe at
        the ablation alpha defaults to the restored continuation's): for a single-run
        configuration a number or [n] array; for a seeded one a list with one
        number or [n] array per seed of `config_seeds` (a number or an array
        alone: the same for every seed).
      finetuned: {kv: one loss per token per seed} of the C4-fine-tuned alpha-0 models.
      times: Per-round times per variant (OUTPUT/markers/timing.done.json).
      articles: Examples per article of OUTPUT/data/heldout_<set>.npz (None: no such file).
    """
    root = output / "evals"
    scores = dict(scores)
    reference = (settings.num_heads, None, settings.ablation_alpha)
    if settings.mha_recipes and reference in scores:
        # Unless given, the multi-head continuation with a fresh optimizer state (C2's reference, the
        # converted models' recipe) scores as the restored one, so hand-computed gaps hold for both.
        scores.setdefault((settings.num_heads, "fresh", settings.ablation_alpha), scores[reference])
    for (kv, method, alpha), values in scores.items():
        run_seeds = config_seeds(settings, kv, method, seeds)
        single = alpha == 0 and (kv == settings.num_heads or split_label(method)[0] not in SEEDED_METHODS)
        if not single and not isinstance(values, list):
            values = [values] * len(run_seeds)
        write_config(root, settings, kv, method, alpha, run_seeds, values)
    for kv, values in (finetuned or {}).items():
        write_finetuned(root, settings, kv, seeds, values)
    if times is not None:
        write_timing(output, settings, times)
    if articles is not None:
        write_articles(output, settings, articles)


def write_timing(output: Path, settings: StudySettings, times: dict[str, list[float]], batch: int = 2) -> None:
    """OUTPUT/markers/timing.done.json with per-round times per variant at the study's first shape."""
    markers = output / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    n_in, n_out = settings.timing_shapes[0]
    (markers / "timing.done.json").write_text(json.dumps({"batch": batch, "rounds": len(times["MHA"]), "shapes": [
        {"input_length": n_in, "output_length": n_out, "time_per_sample": times}]}))


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval, with the tabulated quantile."""
    x = np.asarray(values, np.float64)
    mean, sd = x.mean(), x.std(ddof=1)
    half = T975[x.size - 1] * sd / np.sqrt(x.size)
    return float(mean), float(mean - half), float(mean + half)
