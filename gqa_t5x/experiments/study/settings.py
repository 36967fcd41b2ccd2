"""What the reproduction study runs: sizes, steps, variants, and run names.

`StudySettings()` is the full study (about 2 hours on a 2-core CPU, see
docs/experiments.md); `StudySettings.reduced()` the minutes-scale setting the
tests run, which checks the machinery only (`is_reduced`: its report says its
verdicts are not meaningful); `StudySettings.quickstart()` the conversion
ablation at alpha = 0 that `gqa-t5x quickstart` runs. The seeds are not part of the settings: they
are a command-line option, and a run of seed s is named by it, so a later
invocation with other seeds adds runs to the same output directory.

Names of evaluated models (`evaluation keys`), used for files and in
`reproduction.json`:

    mha_a0                       the pre-trained multi-head model
    mha_a{alpha}_s{seed}         it, trained alpha * P more steps
    g{G}_{method}_a0             converted, no uptraining (deterministic method)
    g{G}_{method}_a0_s{seed}     converted with a seeded method (random)
    g{G}_{method}_a{alpha}_s{seed}  converted and uptrained
    pretrain_{step}              pre-training checkpoints (the loss curve)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from gqa_t5x.model.config import check_kv_heads

# Conversion methods whose result depends on the seed.
SEEDED_METHODS: frozenset[str] = frozenset({"random"})

# Pre-training shorter than this checks the machinery only: the model is too
# far from trained for the study's verdicts to mean anything (the reduced
# settings pre-train 20-40 steps, the quickstart 600, the study 2,000).
MEANINGFUL_PRETRAIN_STEPS = 200


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Sizes of the reproduction study.

    Attributes:
      emb_dim: d_model.
      num_heads: Query heads H (8: G = 1, 2, 4, 8 all exist).
      head_dim: d_kv.
      mlp_dim: d_ff of the gated-GELU MLP.
      num_layers: Encoder and decoder layers (each).
      vocab_pieces: SentencePiece pieces trained on the corpus (+ 100
        sentinels, padded to a multiple of 128).
      vocab_sentences: Corpus lines the vocabulary is trained on (plus a
        quarter as many WMT training sentences of each language, so German
        has pieces).
      corpus_articles: Train articles to copy into a small local corpus
        (None: read the whole shared corpus in place); the validation split
        keeps a tenth as many.
      input_length: Span-corruption inputs per example.
      target_length: Span-corruption targets per example.
      batch_size: Pre-training and uptraining batch (examples).
      pretrain_steps: P, pre-training steps.
      warmup_fraction: T5's inverse square root schedule compressed to P:
        constant `peak_learning_rate` for this fraction of P, then
        1/sqrt(step) decay (continued, by global step, during uptraining).
      peak_learning_rate: T5's 0.01.
      curve_points: Pre-training checkpoints evaluated for the loss curve.
      gqa_kv_heads: G of the GQA variant.
      methods: Conversion methods of the ablation (MQA, and GQA unless
        `gqa_methods` is given).
      gqa_methods: Methods of the GQA variant (None: `methods`).
      ablation_alpha: alpha of the conversion ablation and of the downstream
        comparison (paper: 0.05).
      alphas: Uptraining proportions of the alpha curve (mean pooling; 0 is
        always evaluated).
      heldout_examples: Held-out span-corruption examples per set, as
        ((name, n), ...): 'c4' is the C4 validation sample, any other name
        the corpus's validation split; the first set is the primary metric.
      conversion_only: Stop after the conversions at alpha = 0 (no
        uptraining, fine-tuning or timing): the quickstart's study.
      calibration_examples: Training examples whose activations calibrate `lsq`.
      bootstrap_resamples: Resamples of the bootstrap over examples.
      finetune_steps: WMT En-De fine-tuning steps.
      finetune_seeds: Fine-tune with the first N seeds only (None: all).
      finetune_variants: Variants fine-tuned: 'MHA', 'GQA' and/or 'MQA'.
      finetune_batch: Fine-tuning batch.
      wmt_length: Input and target length of WMT (longer pairs are left out).
      bleu_examples: WMT validation pairs scored with BLEU (greedy) and
        with the teacher-forced loss.
      timing_batch: Batch of the time-per-sample measurement.
      timing_rounds: Interleaved timing rounds per shape.
      timing_shapes: (input, output) lengths timed; the first is the study's.
    """

    emb_dim: int = 128
    num_heads: int = 8
    head_dim: int = 16
    mlp_dim: int = 384
    num_layers: int = 2
    vocab_pieces: int = 7900
    vocab_sentences: int = 40_000
    corpus_articles: int | None = None
    input_length: int = 64
    target_length: int = 16
    batch_size: int = 32
    pretrain_steps: int = 2000
    warmup_fraction: float = 0.1
    peak_learning_rate: float = 0.01
    curve_points: int = 10
    gqa_kv_heads: int = 2
    methods: tuple[str, ...] = ("mean", "first", "random", "align", "lsq")
    gqa_methods: tuple[str, ...] | None = None
    ablation_alpha: float = 0.05
    alphas: tuple[float, ...] = (0.025, 0.05, 0.1)
    heldout_examples: tuple[tuple[str, int], ...] = (("wikipedia", 1024), ("c4", 256))
    conversion_only: bool = False
    calibration_examples: int = 256
    bootstrap_resamples: int = 2000
    finetune_steps: int = 150
    finetune_seeds: int | None = None
    finetune_variants: tuple[str, ...] = ("MHA", "GQA", "MQA")
    finetune_batch: int = 16
    wmt_length: int = 48
    bleu_examples: int = 500
    timing_batch: int = 16
    timing_rounds: int = 5
    timing_shapes: tuple[tuple[int, int], ...] = ((64, 16), (512, 128))

    @classmethod
    def reduced(cls) -> StudySettings:
        """Minutes-scale settings for the tests: every stage, tiny sizes (`is_reduced`)."""
        return cls(emb_dim=32, head_dim=4, mlp_dim=64, num_layers=1, vocab_pieces=400, vocab_sentences=2000,
                   corpus_articles=120, input_length=32, target_length=8, batch_size=8, pretrain_steps=40,
                   alphas=(0.05, 0.1),
                   curve_points=2, methods=("mean", "lsq"), gqa_methods=("mean",), finetune_variants=("MQA",),
                   heldout_examples=(("wikipedia", 32), ("c4", 16)), calibration_examples=16,
                   bootstrap_resamples=200, finetune_steps=2, finetune_seeds=1, finetune_batch=8,
                   wmt_length=32, bleu_examples=8, timing_batch=2, timing_rounds=2, timing_shapes=((32, 8),))

    @classmethod
    def quickstart(cls) -> StudySettings:
        """`gqa-t5x quickstart`: pre-training on stdlib docstrings, every method at alpha = 0."""
        return cls(vocab_pieces=2000, pretrain_steps=600, curve_points=3,
                   heldout_examples=(("docstrings", 512),), calibration_examples=128, conversion_only=True)

    @property
    def is_reduced(self) -> bool:
        """Whether these sizes check the machinery only (`reduced()`, the
        quickstart's reduced settings, anything pre-trained for fewer than
        `MEANINGFUL_PRETRAIN_STEPS` steps): the report then says that its
        verdicts are not meaningful."""
        return self.pretrain_steps < MEANINGFUL_PRETRAIN_STEPS

    @property
    def primary_set(self) -> str:
        """The held-out set of the primary metric."""
        return self.heldout_examples[0][0]

    @property
    def vocab_size(self) -> int:
        """Pieces + 100 sentinels, padded to a multiple of 128 (as T5's 32128)."""
        return -(-(self.vocab_pieces + 100) // 128) * 128

    @property
    def warmup_steps(self) -> int:
        """Steps at the peak learning rate."""
        return max(1, round(self.warmup_fraction * self.pretrain_steps))

    @property
    def all_alphas(self) -> tuple[float, ...]:
        """Every uptraining proportion any run reaches, ascending."""
        return tuple(sorted({*self.alphas, self.ablation_alpha}))

    def finetuned(self) -> tuple[tuple[int, str | None], ...]:
        """(kv heads, method) of each fine-tuned variant (GQA and MQA from mean)."""
        kinds = {"MHA": (self.num_heads, None), "GQA": (self.gqa_kv_heads, "mean"), "MQA": (1, "mean")}
        return tuple(kinds[v] for v in self.finetune_variants)

    def methods_for(self, kv_heads: int) -> tuple[str, ...]:
        """The conversion methods run for a variant (MQA: `methods`; GQA: `gqa_methods`)."""
        if kv_heads == 1 or self.gqa_methods is None:
            return self.methods
        return self.gqa_methods

    def alpha_steps(self, alpha: float) -> int:
        """Uptraining steps of `alpha` (alpha * P)."""
        return round(alpha * self.pretrain_steps)

    def checkpoint_period(self, alphas: Sequence[float]) -> int:
        """A period whose multiples hit the step of every alpha in `alphas`."""
        return math.gcd(*(self.alpha_steps(a) for a in alphas))

    def uptrain_alphas(self, method: str | None) -> tuple[float, ...]:
        """The alphas a run is evaluated at: every alpha for mean and the MHA
        continuation (the alpha curve), the ablation alpha for the others."""
        return self.all_alphas if method in (None, "mean") else (self.ablation_alpha,)

    def validate(self) -> None:
        """Checks the settings; raises ValueError naming the field."""
        check_kv_heads(self.num_heads, self.gqa_kv_heads, name="gqa_kv_heads")
        if not 1 < self.gqa_kv_heads < self.num_heads:
            raise ValueError(f"gqa_kv_heads={self.gqa_kv_heads} must lie strictly between 1 (MQA) and "
                             f"num_heads={self.num_heads} (MHA).")
        for field in ("methods", "gqa_methods"):
            value = getattr(self, field)
            if value is not None and "mean" not in value:
                raise ValueError(f"{field}={value} must include 'mean' (the paper's method and the reference).")
        if not self.conversion_only and self.ablation_alpha not in self.alphas:
            raise ValueError(f"ablation_alpha={self.ablation_alpha} must be one of alphas={self.alphas}.")
        for alpha in () if self.conversion_only else self.all_alphas:
            steps = alpha * self.pretrain_steps
            if not 0 < alpha <= 1 or abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"alpha={alpha} must be in (0, 1] with alpha * pretrain_steps "
                                 f"({self.pretrain_steps}) a whole number of steps.")
        if self.pretrain_steps % self.curve_points:
            raise ValueError(f"pretrain_steps={self.pretrain_steps} must be a multiple of curve_points={self.curve_points}.")
        if self.input_length < 16 or self.target_length < 4:
            raise ValueError("input_length must be >= 16 and target_length >= 4.")
        if not self.heldout_examples or min(n for _, n in self.heldout_examples) < 2:
            raise ValueError(f"heldout_examples={self.heldout_examples} needs at least 2 examples per set.")
        unknown = sorted(set(self.finetune_variants) - {"MHA", "GQA", "MQA"})
        if unknown:
            raise ValueError(f"finetune_variants has unknown variant(s) {unknown}; choose among MHA, GQA, MQA.")
        if len({name for name, _ in self.heldout_examples}) != len(self.heldout_examples):
            raise ValueError(f"heldout_examples={self.heldout_examples} names a set twice.")

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples become lists)."""
        return json_ready(dataclasses.asdict(self))


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (so a settings dict compares equal to its JSON)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def check_seeds(seeds: Sequence[int], pretrain_seed: int) -> tuple[int, ...]:
    """Validates the study's seeds.

    Args:
      seeds: Seeds of uptraining / fine-tuning / seeded methods (>= 2 distinct).
      pretrain_seed: Seed of pre-training (must not be among `seeds`, or that
        seed's uptraining would replay the pre-training's first batches).

    Returns:
      The seeds as a tuple.
    """
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError(f"--seeds {list(seeds)}: give at least 2 distinct seeds (3 or more for the study).")
    if pretrain_seed in seeds:
        raise ValueError(f"--seeds {list(seeds)} contains the pre-training seed {pretrain_seed}; its uptraining "
                         "would see the pre-training's data order again. Choose other seeds.")
    return seeds


# ------------------------------------------------------------------- names
def variant(kv_heads: int, num_heads: int) -> str:
    """'MHA', 'MQA' or 'GQA-G'."""
    if kv_heads == num_heads:
        return "MHA"
    return "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"


def alpha_tag(alpha: float) -> str:
    """0.05 -> '0.05', 0 -> '0'."""
    return f"{alpha:g}"


def eval_key(kv_heads: int, num_heads: int, method: str | None, alpha: float, seed: int | None) -> str:
    """The evaluation key of a model (see the module docstring)."""
    if kv_heads == num_heads:
        if alpha == 0:
            return "mha_a0"
        return f"mha_a{alpha_tag(alpha)}_s{seed}"
    if method is None:
        raise ValueError("A converted model needs its method.")
    base = f"g{kv_heads}_{method}_a{alpha_tag(alpha)}"
    if alpha == 0 and method not in SEEDED_METHODS:
        return base
    return f"{base}_s{seed}"


def uptrain_run(kv_heads: int, num_heads: int, method: str | None, seed: int) -> str:
    """The directory name of one uptraining run (all its alphas)."""
    if kv_heads == num_heads:
        return f"mha_s{seed}"
    return f"g{kv_heads}_{method}_s{seed}"


def conversion_name(kv_heads: int, method: str, seed: int | None) -> str:
    """The directory name of one converted checkpoint."""
    return f"g{kv_heads}_{method}" + (f"_s{seed}" if method in SEEDED_METHODS else "")
