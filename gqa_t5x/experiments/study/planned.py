"""Planned kv-head configurations on the study's model, against its uniform GQA.

Issue #24 asks whether a configuration chosen before training (kv heads that
differ per layer and per attention kind, `gqa-t5x plan`) beats uniform GQA at
equal key/value cache bytes, at alpha 0 and after the study's uptraining.
This module answers it on a finished study (`gqa-t5x reproduce`), reusing
its pre-trained model, data rows, recipe and held-out sets, so the uniform
runs it compares against are the study's own:

* each planned variant is converted from the study's pre-trained multi-head
  checkpoint (the variant's method and grouping) and scored at alpha 0;
* then uptrained for each seed exactly as the study's `g<G>_mean_s<seed>`
  runs were (same rows, fresh optimizer state, same steps and checkpoints),
  with the variant's per-layer counts as gin bindings, and scored at each
  alpha;
* loss(planned) - loss(uniform GQA-G, the study's) is paired by seed and
  held-out example, with intervals over seeds and articles
  (`statistics.paired_difference`), Holm's correction over the variants'
  cells, and a verdict.

Everything new goes under its own OUTPUT; the study's directory is read only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gqa_t5x.experiments import roofline
from gqa_t5x.experiments.study import data as rdata
from gqa_t5x.experiments.study import statistics as st
from gqa_t5x.experiments.study.settings import StudySettings, UptrainRun, alpha_tag, eval_key
from gqa_t5x.experiments.study.stages import Stages, write_json
from gqa_t5x.model.config import T5Config


@dataclasses.dataclass(frozen=True)
class PlannedVariant:
    """A kv-head configuration to uptrain beside the study's uniform GQA.

    Attributes:
      decoder_self: Decoder self-attention kv heads, one per decoder layer.
      decoder_cross: Encoder-decoder attention kv heads, one per decoder layer.
      reference: The study's uniform variant it is compared with (its kv
        heads G: the study's `g<G>_mean` runs), normally the one with the
        same cache bytes.
      method: Conversion method.
      grouping: Conversion grouping ('contiguous' or 'similarity').
    """

    decoder_self: tuple[int, ...]
    decoder_cross: tuple[int, ...]
    reference: int
    method: str = "mean"
    grouping: str = "contiguous"

    @property
    def name(self) -> str:
        """E.g. 'self1-1_cross2-4_mean' (plus '_similarity' for that grouping)."""
        counts = f"self{'-'.join(map(str, self.decoder_self))}_cross{'-'.join(map(str, self.decoder_cross))}"
        return f"{counts}_{self.method}" + ("" if self.grouping == "contiguous" else f"_{self.grouping}")

    def bindings(self) -> tuple[str, ...]:
        """The model gin bindings of its counts."""
        return (f"DECODER_SELF_KV_HEADS={tuple(self.decoder_self)!r}",
                f"DECODER_CROSS_KV_HEADS={tuple(self.decoder_cross)!r}")

    def config(self, base: T5Config) -> T5Config:
        """`base` (the study's multi-head config) with this variant's counts."""
        return base.replace(decoder_self_kv_heads=tuple(self.decoder_self),
                            decoder_cross_kv_heads=tuple(self.decoder_cross))


def parse_variant(text: str, reference: int, method: str = "mean", grouping: str = "contiguous") -> PlannedVariant:
    """'1,1/2,4' (self counts / cross counts, one per decoder layer) -> a `PlannedVariant`."""
    try:
        self_text, cross_text = text.split("/")
        counts = [tuple(int(v) for v in part.split(",")) for part in (self_text, cross_text)]
    except ValueError:
        raise ValueError(f"{text!r} is not SELF/CROSS kv-head counts, e.g. '1,1/2,4' (one count per decoder "
                         "layer on each side of the slash).") from None
    return PlannedVariant(counts[0], counts[1], reference, method, grouping)


def settings_of(study: Path) -> tuple[StudySettings, int]:
    """The settings and pre-training seed a finished study recorded (study.json)."""
    path = study / "study.json"
    if not path.is_file():
        raise ValueError(f"{study} holds no study (no study.json): run `gqa-t5x reproduce --output {study}` first.")
    record = json.loads(path.read_text())

    def tuples(value: Any) -> Any:
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    fields = {f.name for f in dataclasses.fields(StudySettings)}
    settings = StudySettings(**{k: tuples(v) for k, v in record["settings"].items() if k in fields})
    return settings, int(record["pretrain_seed"])


def check_variants(study: str | Path, variants: Sequence[PlannedVariant]) -> T5Config:
    """Refuses variants the study's model cannot take, before anything is written.

    Returns:
      The study's multi-head config.

    Raises:
      ValueError: counts that do not fit the model (naming the field and
        layer), a reference the study did not run, or an unknown grouping.
    """
    from gqa_t5x import checkpoints
    from gqa_t5x.conversion import grouping

    study = Path(study)
    settings, _ = settings_of(study)
    with checkpoints.open_checkpoint(study / "pretrain" / f"checkpoint_{settings.pretrain_steps}") as reader:
        base = reader.config
    for variant in variants:
        variant.config(base)
        references = [settings.gqa_kv_heads, *settings.group_kv_heads]
        if variant.reference not in references:
            raise ValueError(f"The study has no uniform GQA-{variant.reference} to compare with; choose one of "
                             f"{references} (--reference).")
        if variant.method not in settings.methods_for(variant.reference):
            raise ValueError(f"The study uptrained GQA-{variant.reference} with {settings.methods_for(variant.reference)}, "
                             f"not {variant.method!r}: pairs need the same method (--method).")
        if variant.grouping not in grouping.GROUPINGS:
            raise ValueError(f"--grouping {variant.grouping!r} is not a grouping; choose one of {list(grouping.GROUPINGS)}.")
    return base


def kv_cache_numbers(config: T5Config, input_length: int, output_length: int) -> int:
    """Key/value cache numbers per sample (self + cross, every decoder layer)."""
    return sum(roofline.cache_numbers(config, 1, input_length, output_length).values())


def _sums(evals: Path, key: str, heldout: str) -> tuple[np.ndarray, np.ndarray]:
    path = evals / f"{key}.npz"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the study has no evaluation {key!r} to compare with.")
    with np.load(path) as f:
        return np.asarray(f[f"{heldout}/loss"]), np.asarray(f[f"{heldout}/tokens"])


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(pairs) == 1:
        return pairs[0]
    return np.stack([n for n, _ in pairs]), np.stack([d for _, d in pairs])


def run_planned(study: str | Path, output: str | Path, variants: Sequence[PlannedVariant], *,
                seeds: Sequence[int] = (0, 1, 2, 3, 4), alphas: Sequence[float] | None = None,
                shape: tuple[int, int] = (2048, 512), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Converts, uptrains and scores `variants` on a finished study; compares them with its uniform GQA.

    Resumable: finished conversions, runs and evaluations (markers under
    OUTPUT) are kept.

    Args:
      study: A finished study's OUTPUT (read only).
      output: This comparison's directory.
      variants: The planned variants.
      seeds: Uptraining seeds (the study's runs of these seeds are the pairs).
      alphas: Uptraining fractions (default: the study's ablation alpha).
      shape: (input, output) length at which cache sizes are compared.
      log: Progress messages.

    Returns:
      The results (also written to OUTPUT/planned.json).
    """
    from gqa_t5x import conversion

    study, out = Path(study).resolve(), Path(output).resolve()
    settings, pretrain_seed = settings_of(study)
    alphas = tuple(alphas or (settings.ablation_alpha,))
    data = rdata.StudyData(study / "data")
    stages = Stages(out, settings, data, pretrain_seed, log)
    source = str(study / "pretrain" / f"checkpoint_{settings.pretrain_steps}")
    statistics = None
    if any(v.grouping == "similarity" or conversion.get_method(v.method).needs_calibration for v in variants):
        # Collected here from the study's calibration examples (this version's statistics include what
        # the similarity grouping reads), into OUTPUT/stats.
        statistics = stages.calibrate(source)
    heldout = settings.primary_set
    with np.load(study / "data" / f"heldout_{heldout}.npz") as f:
        clusters = np.asarray(f["article"]) if "article" in f.files else None
    h = settings.num_heads
    base = check_variants(study, variants)
    results: dict[str, Any] = {"study": str(study), "seeds": list(seeds), "alphas": list(alphas),
                               "heldout": heldout, "shape": list(shape), "variants": []}
    for variant in variants:
        reference_config = base.replace(num_kv_heads=variant.reference)
        config = variant.config(base)  # validates the counts against the study's model
        name = variant.name
        converted = out / "convert" / name
        if stages.done(f"convert_{name}") is None:
            start = time.time()
            needs = variant.grouping == "similarity" or conversion.get_method(variant.method).needs_calibration
            conversion.convert_checkpoint(
                source, converted, method=variant.method, decoder_self_kv_heads=variant.decoder_self,
                decoder_cross_kv_heads=variant.decoder_cross, grouping=variant.grouping,
                calibration=str(statistics) if needs else None, progress=False, overwrite=True)
            stages.mark(f"convert_{name}", {"checkpoint": str(converted)}, start)
        keys = {0.0: [f"{name}_a0"]}
        stages.evaluate(keys[0.0][0], str(converted))
        for seed in seeds:
            run = UptrainRun(variant.reference, variant.method, seed, alphas)
            at = stages.uptrain(str(converted), run, name=f"{name}_s{seed}", model_bindings=variant.bindings())
            for alpha, checkpoint in at.items():
                key = f"{name}_a{alpha_tag(alpha)}_s{seed}"
                stages.evaluate(key, checkpoint)
                keys.setdefault(alpha, []).append(key)
        cells = []
        for alpha in (0.0, *alphas):
            ours = _stack([_sums(out / "evals", k, heldout) for k in keys[alpha]])
            theirs_keys = ([eval_key(variant.reference, h, variant.method, 0.0, None)] if alpha == 0 else
                           [eval_key(variant.reference, h, variant.method, alpha, seed) for seed in seeds])
            theirs = _stack([_sums(study / "evals", k, heldout) for k in theirs_keys])
            interval = st.paired_difference(*ours, *theirs, clusters, num_resamples=settings.bootstrap_resamples)
            per_run = np.atleast_2d(ours[0]).sum(1) / np.atleast_2d(ours[1]).sum(1)  # loss per token of each run
            cells.append({"alpha": alpha, "planned_loss": float(per_run.mean()), "difference": interval.to_json()})
        results["variants"].append({
            "name": name, "decoder_self": list(variant.decoder_self), "decoder_cross": list(variant.decoder_cross),
            "method": variant.method, "grouping": variant.grouping, "reference": f"GQA-{variant.reference}",
            "kv_cache_numbers": kv_cache_numbers(config, *shape),
            "reference_kv_cache_numbers": kv_cache_numbers(reference_config, *shape), "cells": cells})
    p_values = [c["difference"]["p_value"] for v in results["variants"] for c in v["cells"]]
    adjusted = iter(st.holm(p_values))
    for v in results["variants"]:
        for c in v["cells"]:
            c["holm_p"] = next(adjusted)
            d = c["difference"]
            c["verdict"] = ("planned better" if c["holm_p"] < st.LEVEL and d["mean"] < 0 else
                            "uniform better" if c["holm_p"] < st.LEVEL else "no difference resolved")
    write_json(out / "planned.json", results)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The comparison as a markdown table."""
    input_length, output_length = results["shape"]
    lines = [f"Planned kv heads against the study's uniform GQA ({results['heldout']} held-out loss; "
             f"seeds {', '.join(map(str, results['seeds']))}; loss(planned) - loss(uniform), paired by seed and "
             f"example, intervals over seeds and articles, Holm over the cells below; cache numbers per sample at "
             f"input {input_length} / output {output_length}).", "",
             "| planned (self / cross kv heads) | method | vs | cache numbers (planned / uniform) | alpha | "
             "planned loss | difference [95% interval] | Holm p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        counts = f"{'-'.join(map(str, v['decoder_self']))} / {'-'.join(map(str, v['decoder_cross']))}"
        for c in v["cells"]:
            d = c["difference"]
            lines.append(
                f"| {counts} | {v['method']}{'' if v['grouping'] == 'contiguous' else ', ' + v['grouping']} | "
                f"{v['reference']} | {v['kv_cache_numbers']:,} / {v['reference_kv_cache_numbers']:,} | "
                f"{c['alpha']:g} | {c['planned_loss']:.4f} | {d['mean']:.4f} [{d['low']:.4f}, {d['high']:.4f}] "
                f"({d['kind']}) | {c['holm_p']:.3g} | {c['verdict']} |")
    return "\n".join(lines) + "\n"
