"""The GQA paper's published numbers, as a reference series for reports.

Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints", EMNLP 2023 (arXiv:2305.13245). Scores are dev-set
ROUGE-1 (summarisation), BLEU (WMT14 En-De) and F1 (TriviaQA); times are
seconds per sample per TPUv4 chip.
"""

from __future__ import annotations

# The ablations average these three tasks.
ABLATION_TASKS: tuple[str, ...] = ("cnn_dailymail", "multi_news", "triviaqa")

# Table 1: (time per sample [s], average, per-task scores).
# Table 1 columns, by task key (the task table, `gqa_t5x.data.task_table`,
# knows each key's column label and metric).
_TABLE1_TASKS = ("cnn_dailymail", "arxiv", "pubmed", "mediasum", "multi_news", "wmt14_ende", "triviaqa")
TABLE1: dict[str, dict] = {
    "MHA-Large": {"time": 0.37, "avg": 46.0, "scores": dict(zip(_TABLE1_TASKS, (42.9, 44.6, 46.2, 35.5, 46.6, 27.7, 78.2)))},
    "MHA-XXL": {"time": 1.51, "avg": 47.2, "scores": dict(zip(_TABLE1_TASKS, (43.8, 45.6, 47.5, 36.4, 46.9, 28.4, 81.9)))},
    "MQA-XXL": {"time": 0.24, "avg": 46.6, "scores": dict(zip(_TABLE1_TASKS, (43.0, 45.0, 46.9, 36.1, 46.5, 28.5, 81.3)))},
    "GQA-8-XXL": {"time": 0.28, "avg": 47.1, "scores": dict(zip(_TABLE1_TASKS, (43.5, 45.4, 47.7, 36.3, 47.2, 28.4, 81.6)))},
}

# Uptraining proportion (T5-XXL; mean of CNN/DM, MultiNews, TriviaQA).
ALPHA_CURVES: dict[str, dict[float, float]] = {
    "GQA-8": {0.0: 56.71, 0.05: 57.40, 0.1: 57.56},
    "MQA": {0.0: 53.93, 0.05: 56.92, 0.1: 57.15},
}
ALPHA_MHA_LINE = 57.54

# Conversion method (T5-Large -> MQA, alpha 0.05; read off the figure +-0.01).
CONVERSION_METHODS: dict[str, float] = {"mean": 55.55, "first": 55.45, "random": 55.23}
CONVERSION_MHA_LARGE = 55.90

# Time per sample against the number of groups (XXL, input 2048, output 512).
TIME_VS_GROUPS: dict[int, float] = {1: 0.49, 4: 0.48, 8: 0.51, 16: 0.59, 32: 0.80, 64: 2.53}
