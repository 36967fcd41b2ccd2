"""What the reproduction study runs: sizes, steps, variants, and run names.

`StudySettings()` is the full study (about 2 hours on a 2-core CPU, see
docs/experiments.md); `StudySettings.reduced()` the minutes-scale setting the
tests run, which checks the machinery only (`is_reduced`: its report says its
verdicts are not meaningful); `StudySettings.quickstart()` the conversion
ablation at alpha = 0 that `gqa-t5x quickstart` runs. The seeds are not part of the settings: they
are a command-line option, and a run of seed s is named by it (and reads the
rows `data_row(s)`), so a later invocation with other seeds adds runs to the
same output directory as long as its data cache holds their rows
(`cache_rows`; seeds larger than the first session's need a new directory).

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
from typing import Any, ClassVar

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
      num_heads: Query heads H (16: GQA-2 keeps 8 query heads per kv head,
        as the paper's GQA-8 of 64 heads does).
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
      gqa_kv_heads: G of the GQA variant of every comparison.
      group_kv_heads: Further GQA variants, converted with mean pooling and
        uptrained to `ablation_alpha` (the quality side of the groups curve).
      methods: Conversion methods of the ablation (MQA, and GQA unless
        `gqa_methods` is given).
      gqa_methods: Methods of the GQA variant (None: `methods`).
      curve_methods: Methods with an alpha curve: mean pooling over `alphas`
        (the paper's Fig. 5), the others over `saving_alphas` (where they
        reach mean pooling's loss at `ablation_alpha`: the uptraining they
        save); the methods not named here run to `ablation_alpha` only.
      saving_alphas: The alphas of the curve of a non-mean `curve_methods`
        method (up to `ablation_alpha`: beyond it there is no saving).
      keep_state_methods: Methods uptrained a second time keeping the
        pre-training optimizer state of every parameter the conversion
        leaves unchanged in shape and value (beyond the paper; the paper's
        recipe starts the optimizer afresh): mean pooling to
        `ablation_alpha`, a `curve_methods` method over `saving_alphas`.
      mha_recipes: Run the 2x2 of the multi-head continuation at
        `ablation_alpha` (optimizer state restored / fresh x data continued /
        replayed from row 0) that decides the uptraining recipe.
      random_seeds: Seeds of the `random` method (the first uptraining
        seeds, then the next integers).
      ablation_alpha: alpha of the conversion ablation and of the downstream
        comparison (paper: 0.05).
      alphas: Uptraining proportions of the alpha curve (0 is always evaluated).
      heldout_examples: Held-out span-corruption examples per set, as
        ((name, n), ...): 'c4' is the C4 validation sample, any other name
        the corpus's validation split; the first set is the primary metric.
      conversion_only: Stop after the conversions at alpha = 0 (no
        uptraining, fine-tuning or timing): the quickstart's study.
      calibration_examples: Training examples whose activations calibrate `lsq`.
      bootstrap_resamples: Resamples of the article bootstrap.
      c4_finetune_steps: Steps of the short fine-tune on the C4 sample (a new
        domain) of the alpha-0 conversions (claim C3b; 0 skips it).
      c4_finetune_batch: Its batch.
      finetune_steps: WMT En-De fine-tuning steps.
      finetune_seeds: Fine-tune with the first N seeds only (None: all).
      finetune_variants: Variants fine-tuned on WMT: 'MHA', 'GQA' and/or 'MQA'
        (none by default: at this scale no model learns to translate, BLEU
        < 0.01 in the 2026-12-06 run; see docs/reproduction.md).
      finetune_batch: WMT fine-tuning batch.
      wmt_length: Input and target length of WMT (longer pairs are left out).
      bleu_examples: WMT validation pairs scored with BLEU (greedy) and
        with the teacher-forced loss.
      timing_batch: Batch of the time-per-sample measurement.
      timing_rounds: Interleaved timing rounds per shape (order randomised).
      timing_shapes: (input, output) lengths timed; the first is the study's.
      timing_model: Shape of the randomly initialised model timed for C4
        ((emb_dim, head_dim, mlp_dim, layers): T5-Large's attention, 16
        heads of 64, at a shape where the KV cache matters); None times the
        study's own uptrained checkpoints.
    """

    emb_dim: int = 128
    num_heads: int = 16
    head_dim: int = 16
    mlp_dim: int = 384
    num_layers: int = 2
    vocab_pieces: int = 7900
    vocab_sentences: int = 40_000
    corpus_articles: int | None = None
    input_length: int = 64
    target_length: int = 16
    batch_size: int = 16
    pretrain_steps: int = 4000
    warmup_fraction: float = 0.1
    peak_learning_rate: float = 0.01
    curve_points: int = 10
    gqa_kv_heads: int = 2
    group_kv_heads: tuple[int, ...] = (4,)
    methods: tuple[str, ...] = ("mean", "first", "random", "align", "lsq")
    gqa_methods: tuple[str, ...] | None = ("mean", "align")
    curve_methods: tuple[str, ...] = ("mean", "align")
    saving_alphas: tuple[float, ...] = (0.00625, 0.0125, 0.025, 0.05)
    keep_state_methods: tuple[str, ...] = ("mean", "align")
    mha_recipes: bool = True
    random_seeds: int = 10
    ablation_alpha: float = 0.05
    alphas: tuple[float, ...] = (0.025, 0.05, 0.1)
    heldout_examples: tuple[tuple[str, int], ...] = (("wikipedia", 2048), ("c4", 512))
    conversion_only: bool = False
    calibration_examples: int = 256
    bootstrap_resamples: int = 2000
    c4_finetune_steps: int = 100
    c4_finetune_batch: int = 16
    finetune_steps: int = 150
    finetune_seeds: int | None = None
    finetune_variants: tuple[str, ...] = ()
    finetune_batch: int = 16
    wmt_length: int = 48
    bleu_examples: int = 500
    timing_batch: int = 16
    timing_rounds: int = 7
    timing_shapes: tuple[tuple[int, int], ...] = ((512, 128),)
    timing_model: tuple[int, int, int, int] | None = (1024, 64, 2816, 2)

    @classmethod
    def reduced(cls) -> StudySettings:
        """Minutes-scale settings for the tests: every stage, tiny sizes (`is_reduced`)."""
        return cls(emb_dim=32, head_dim=4, mlp_dim=64, num_layers=1, vocab_pieces=400, vocab_sentences=2000,
                   corpus_articles=120, input_length=32, target_length=8, batch_size=8, pretrain_steps=40,
                   alphas=(0.05, 0.1), curve_points=2, methods=("mean", "lsq"), gqa_methods=("mean",),
                   curve_methods=("mean", "lsq"), saving_alphas=(0.025, 0.05), keep_state_methods=("lsq",),
                   random_seeds=2,
                   heldout_examples=(("wikipedia", 32), ("c4", 16)), calibration_examples=16,
                   bootstrap_resamples=200, c4_finetune_steps=2, c4_finetune_batch=8, finetune_variants=(),
                   timing_batch=2, timing_rounds=2, timing_shapes=((32, 8),), timing_model=(32, 8, 64, 1))

    @classmethod
    def gpu(cls) -> StudySettings:
        """`--preset gpu`: the study's design at a larger width for one GPU.

        16 heads of 32 in d_model 512 (GQA-2 still keeps 8 query heads per kv
        head), 4+4 layers, a 16k-piece vocabulary and batch 32 at P = 4,000:
        about 30x the CPU study's training FLOPs per step, and twice its rows
        (256,000: pre-training plus ten seeds' stretches, about three
        quarters of the shared Wikipedia corpus, so no row is read twice). C4
        is timed at T5-Large's full depth (24+24 layers) at batch 32. Not run
        yet (no GPU was lent to the sessions that wrote it): its wall time is
        not known.
        """
        return cls(emb_dim=512, head_dim=32, mlp_dim=1408, num_layers=4, vocab_pieces=15_900,
                   vocab_sentences=120_000, batch_size=32, calibration_examples=512,
                   c4_finetune_batch=32, timing_batch=32, timing_model=(1024, 64, 2816, 24))

    PRESETS: ClassVar[tuple[str, ...]] = ("cpu", "gpu", "reduced")
    # `--seeds` when none are given: five paired seeds for the study, two for
    # the reduced run (it checks the machinery; pairing needs two).
    PRESET_SEEDS: ClassVar[dict[str, tuple[int, ...]]] = {
        "cpu": (0, 1, 2, 3, 4), "gpu": (0, 1, 2, 3, 4), "reduced": (0, 1)}

    @classmethod
    def preset(cls, name: str) -> StudySettings:
        """The settings of `gqa-t5x reproduce --preset NAME`: 'cpu' (the default,
        about 2 hours on 2 CPU cores), 'gpu' (`gpu`) or 'reduced' (`reduced`)."""
        if name not in cls.PRESETS:
            raise ValueError(f"--preset {name!r} is not a study preset; choose one of {', '.join(cls.PRESETS)}.")
        return cls() if name == "cpu" else getattr(cls, name)()

    @classmethod
    def quickstart(cls) -> StudySettings:
        """`gqa-t5x quickstart`: pre-training on stdlib docstrings, every method at alpha = 0."""
        return cls(num_heads=8, batch_size=32, group_kv_heads=(), gqa_methods=None, random_seeds=8,
                   vocab_pieces=2000, pretrain_steps=600,
                   curve_points=3, heldout_examples=(("docstrings", 512),), calibration_examples=128,
                   conversion_only=True)

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
        """The alphas of the multi-head continuation and mean pooling (`alphas` and the ablation alpha)."""
        return tuple(sorted({*self.alphas, self.ablation_alpha}))

    def finetuned(self) -> tuple[tuple[int, str | None], ...]:
        """(kv heads, method) of each WMT-fine-tuned variant (GQA and MQA from mean)."""
        kinds = {"MHA": (self.num_heads, None), "GQA": (self.gqa_kv_heads, "mean"), "MQA": (1, "mean")}
        return tuple(kinds[v] for v in self.finetune_variants)

    def methods_for(self, kv_heads: int) -> tuple[str, ...]:
        """The conversion methods run for a variant (MQA: `methods`; GQA:
        `gqa_methods`; the `group_kv_heads` variants: mean pooling)."""
        if kv_heads in self.group_kv_heads:
            return ("mean",)
        if kv_heads == 1 or self.gqa_methods is None:
            return self.methods
        return self.gqa_methods

    def converted_variants(self) -> tuple[int, ...]:
        """kv-head counts converted: MQA, GQA-G, then the groups curve's."""
        return (1, self.gqa_kv_heads, *self.group_kv_heads)

    def alpha_steps(self, alpha: float) -> int:
        """Uptraining steps of `alpha` (alpha * P)."""
        return round(alpha * self.pretrain_steps)

    def checkpoint_period(self, alphas: Sequence[float]) -> int:
        """A period whose multiples hit the step of every alpha in `alphas`."""
        return math.gcd(*(self.alpha_steps(a) for a in alphas))

    def uptrain_alphas(self, method: str | None) -> tuple[float, ...]:
        """The alphas a run (its method label, `label`) is evaluated at: every
        alpha for the multi-head continuation and the `curve_methods` (mean
        pooling with the kept state: the ablation alpha only), the ablation
        alpha for the others."""
        base, recipe = (None, None) if method is None else split_label(method)
        if base == "mean" and recipe == KEEP:
            return (self.ablation_alpha,)
        if method is None or base == "mean":
            return self.all_alphas if base in (None, *self.curve_methods) else (self.ablation_alpha,)
        if base in self.curve_methods:
            return self.saving_alphas
        return (self.ablation_alpha,)

    def seeds_of(self, method: str, seeds: Sequence[int]) -> tuple[int, ...]:
        """The seeds a conversion method runs with: `random` with
        `random_seeds` seeds (the given ones, then the next integers), the
        others with `seeds`."""
        seeds = tuple(seeds)
        if split_label(method)[0] not in SEEDED_METHODS:
            return seeds
        extra = [s for s in range(max(seeds) + 1, max(seeds) + 1 + self.random_seeds)]
        return (seeds + tuple(extra))[:max(self.random_seeds, len(seeds))]

    def uptrain_runs(self, seeds: Sequence[int]) -> tuple[UptrainRun, ...]:
        """Every uptraining run of the study, in the order it runs."""
        h, runs = self.num_heads, []
        for seed in seeds:
            runs.append(UptrainRun(h, None, seed, self.uptrain_alphas(None)))
        if self.mha_recipes:
            for recipe in MHA_RECIPES:
                for seed in (seeds if recipe == FRESH else seeds[:1]):  # replays are the same for every seed
                    runs.append(UptrainRun(h, recipe, seed, (self.ablation_alpha,)))
        for kv in self.converted_variants():
            for method in self.methods_for(kv):
                labels = [method] + ([label(method, KEEP)] if method in self.keep_state_methods
                                     and kv not in self.group_kv_heads else [])
                alphas = {name: (self.ablation_alpha,) if kv in self.group_kv_heads else self.uptrain_alphas(name)
                          for name in labels}
                for name in labels:
                    for seed in self.seeds_of(name, seeds):
                        runs.append(UptrainRun(kv, name, seed, alphas[name]))
        return tuple(runs)

    @property
    def pretrain_rows(self) -> int:
        """Rows of the training data pre-training reads (P * batch)."""
        return self.pretrain_steps * self.batch_size

    @property
    def uptrain_rows(self) -> int:
        """Rows of the longest uptraining run (max alpha * P * batch): one seed's stretch."""
        return self.alpha_steps(max(self.all_alphas)) * self.batch_size

    def data_row(self, seed: int, replay: bool = False) -> int:
        """The training data row an uptraining run of `seed` starts at.

        The data continues where pre-training stopped (T5X: the data position
        follows the step), each seed with its own stretch of rows nobody read
        before: seed s reads from row P * batch + s * `uptrain_rows`. A
        replayed run starts at row 0 (the first rows pre-training read).
        """
        if replay:
            return 0
        if seed < 0:
            raise ValueError(f"seed {seed}: the study's seeds must be non-negative (seed s reads its own rows).")
        return self.pretrain_rows + seed * self.uptrain_rows

    def cache_rows(self, seeds: Sequence[int]) -> int:
        """Rows the study's data cache holds: pre-training plus every seed's stretch."""
        if self.conversion_only:
            return self.pretrain_rows
        every = {run.seed for run in self.uptrain_runs(seeds)}
        return self.pretrain_rows + (max(every) + 1) * self.uptrain_rows

    def validate(self) -> None:
        """Checks the settings; raises ValueError naming the field."""
        check_kv_heads(self.num_heads, self.gqa_kv_heads, name="gqa_kv_heads")
        for name, kv in [("gqa_kv_heads", self.gqa_kv_heads), *(("group_kv_heads", g) for g in self.group_kv_heads)]:
            check_kv_heads(self.num_heads, kv, name=name)
            if not 1 < kv < self.num_heads:
                raise ValueError(f"{name}={kv} must lie strictly between 1 (MQA) and num_heads={self.num_heads} (MHA).")
        if self.gqa_kv_heads in self.group_kv_heads:
            raise ValueError(f"group_kv_heads={self.group_kv_heads} repeats gqa_kv_heads={self.gqa_kv_heads}.")
        for field in () if self.conversion_only else ("curve_methods", "keep_state_methods"):
            unknown = sorted(set(getattr(self, field)) - set(self.methods))
            if unknown:
                raise ValueError(f"{field} names method(s) {unknown} that are not among methods={self.methods}.")
        for field in ("methods", "gqa_methods"):
            value = getattr(self, field)
            if value is not None and "mean" not in value:
                raise ValueError(f"{field}={value} must include 'mean' (the paper's method and the reference).")
        if not self.conversion_only and self.ablation_alpha not in self.alphas:
            raise ValueError(f"ablation_alpha={self.ablation_alpha} must be one of alphas={self.alphas}.")
        if not self.conversion_only and max(self.saving_alphas) > self.ablation_alpha:
            raise ValueError(f"saving_alphas={self.saving_alphas} must not exceed ablation_alpha={self.ablation_alpha} "
                             "(the saving is measured against mean pooling at it).")
        for alpha in () if self.conversion_only else {*self.all_alphas, *self.saving_alphas}:
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


# ------------------------------------------------------------------- runs
# Uptraining recipes. A converted model is uptrained with the paper's recipe
# (a fresh optimizer state, the data continued) or, for `keep_state_methods`,
# with KEEP: the pre-training optimizer state of every parameter the
# conversion leaves unchanged. The multi-head continuation (the reference)
# restores the whole optimizer state and continues the data; the 2x2 that
# decides this recipe adds FRESH (fresh state), REPLAY (data from row 0) and
# REPLAY_FRESH (both).
KEEP = "keep"
FRESH = "fresh"
REPLAY = "replay"
REPLAY_FRESH = "replay-fresh"
MHA_RECIPES: tuple[str, ...] = (FRESH, REPLAY, REPLAY_FRESH)


def label(method: str, recipe: str | None = None) -> str:
    """A run's method label: the method, plus '-keep' for the KEEP recipe."""
    return method if recipe is None else f"{method}-{recipe}"


def split_label(method_label: str) -> tuple[str, str | None]:
    """'align-keep' -> ('align', 'keep'); 'mean' -> ('mean', None)."""
    if method_label.endswith(f"-{KEEP}"):
        return method_label[: -len(KEEP) - 1], KEEP
    return method_label, None


@dataclasses.dataclass(frozen=True)
class UptrainRun:
    """One uptraining run: it trains to max(alphas) and is evaluated at each.

    Attributes:
      kv_heads: Its kv heads (num_heads: the multi-head continuation).
      method: Its method label (`label`; for the multi-head model None, or
        one of `MHA_RECIPES`).
      seed: Its seed (its rows of data, `StudySettings.data_row`).
      alphas: The alphas it is evaluated at.
    """

    kv_heads: int
    method: str | None
    seed: int
    alphas: tuple[float, ...]

    @property
    def keeps_state(self) -> bool:
        """Whether it starts from the pre-training optimizer state (all or the unchanged parameters')."""
        if self.method is None or self.method == REPLAY:
            return True
        return self.method not in MHA_RECIPES and split_label(self.method)[1] == KEEP

    @property
    def replays(self) -> bool:
        """Whether its data restarts at row 0 instead of continuing."""
        return self.method in (REPLAY, REPLAY_FRESH)


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
        prefix = "mha" if method is None else f"mha-{method}"
        return f"{prefix}_a{alpha_tag(alpha)}_s{seed}"
    if method is None:
        raise ValueError("A converted model needs its method.")
    if alpha == 0:  # converted, not uptrained: the recipe does not matter yet
        method = split_label(method)[0]
    base = f"g{kv_heads}_{method}_a{alpha_tag(alpha)}"
    if alpha == 0 and method not in SEEDED_METHODS:
        return base
    return f"{base}_s{seed}"


def uptrain_run(kv_heads: int, num_heads: int, method: str | None, seed: int) -> str:
    """The directory name of one uptraining run (all its alphas)."""
    if kv_heads == num_heads:
        return f"mha_s{seed}" if method is None else f"mha-{method}_s{seed}"
    return f"g{kv_heads}_{method}_s{seed}"


def conversion_name(kv_heads: int, method: str, seed: int | None) -> str:
    """The directory name of one converted checkpoint."""
    method = split_label(method)[0]
    return f"g{kv_heads}_{method}" + (f"_s{seed}" if method in SEEDED_METHODS else "")
