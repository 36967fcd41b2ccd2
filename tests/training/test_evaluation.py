"""`training.evaluation`'s console text: every metric with its scale."""

from __future__ import annotations

from gqa_t5x.training import evaluation


def test_metrics_print_with_their_scale_sorted_by_task_and_metric():
    text = evaluation.format_metrics({
        "gqa_wmt14_ende": {"bleu": 3.25},
        "gqa_cnn_dailymail": {"rouge2": 0.1, "rouge1": 0.447},
        "gqa_c4_span_corruption": {"cross_ent_loss": 2.5, "custom": 0.5},
    })
    assert text.splitlines() == [
        "  gqa_c4_span_corruption/cross_ent_loss = 2.5000 (nats per target token)",
        "  gqa_c4_span_corruption/custom = 0.5000",
        "  gqa_cnn_dailymail/rouge1 = 0.4470 (percent, 0-100)",
        "  gqa_cnn_dailymail/rouge2 = 0.1000 (percent, 0-100)",
        "  gqa_wmt14_ende/bleu = 3.2500 (BLEU, 0-100)",
    ]
