"""Tests of the task table: lookups, and a task added through `register_task`."""

from __future__ import annotations

import dataclasses
import functools
import json

import gin
import pytest

from gqa_t5x.data import datasets
from gqa_t5x.data import metrics
from gqa_t5x.data import preprocessors
from gqa_t5x.data import task_table
from gqa_t5x.data import tasks
from gqa_t5x.data.sources import SourceSpec
from gqa_t5x.data.task_table import TaskSpec
from gqa_t5x.training import evaluation
from gqa_t5x.training import best_checkpoint

TOY = TaskSpec(
    name="gqa_test_toy_titles",
    key="test_toy_titles",
    feature_lengths={"inputs": 64, "targets": 16},
    source=SourceSpec("test_toy_titles_data", {"body": False, "title": False}, ("validation",)),
    text_preprocessors=(
        functools.partial(preprocessors.summarize, article_key="body", summary_key="title"),
    ),
    metric_fns=(metrics.rouge,),
    primary_metric="rouge1",
)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_tasks_are_found_by_key_and_by_seqio_name():
    cnn = task_table.by_key("cnn_dailymail")
    assert task_table.by_name("gqa_cnn_dailymail") is cnn
    assert task_table.lookup("cnn_dailymail") is task_table.lookup("gqa_cnn_dailymail") is cnn
    assert cnn.source.location == "cnn_dailymail_data"
    with pytest.raises(KeyError, match=r"Unknown task key 'cnn'; known: .*cnn_dailymail \(gqa_cnn_dailymail\)"):
        task_table.by_key("cnn")
    with pytest.raises(KeyError, match="register_task"):
        task_table.by_name("gqa_cnn")


def test_the_paper_tasks_have_table_1_columns_metrics_and_gin_files_in_order():
    rows = [
        (s.key, s.paper_column, s.primary_metric, s.gin_file) for s in task_table.paper_tasks()
    ]
    assert rows == [
        ("cnn_dailymail", "CNN", "rouge1", "gin/tasks/cnn_dailymail.gin"),
        ("arxiv", "arXiv", "rouge1", "gin/tasks/arxiv.gin"),
        ("pubmed", "PubMed", "rouge1", "gin/tasks/pubmed.gin"),
        ("mediasum", "MediaSum", "rouge1", "gin/tasks/mediasum.gin"),
        ("multi_news", "MultiNews", "rouge1", "gin/tasks/multi_news.gin"),
        ("wmt14_ende", "WMT", "bleu", "gin/tasks/wmt14_ende.gin"),
        ("triviaqa", "TriviaQA", "f1", "gin/tasks/triviaqa.gin"),
    ]
    assert task_table.primary_metric("gqa_wmt14_ende") == "bleu"
    assert task_table.paper_column("c4_span_corruption") is None
    assert task_table.primary_metric("gqa_c4_span_corruption") is None


def test_a_task_registered_through_the_public_api_runs_to_its_metric(shared_dir, tmp_path):
    vocab = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    gin.bind_parameter("gqa_t5x.data.vocabularies.vocabulary_path.path", str(vocab))
    rows = [
        {"body": "The cat sat on the mat all day long.", "title": "A cat on a mat."},
        {"body": "Rain fell over the city through the night.", "title": "Rain at night."},
        {"body": "The team won the final after extra time.", "title": "Team wins final."},
    ]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tasks.register_task(TOY)
    gin.bind_parameter("gqa_t5x.data.tasks.test_toy_titles_data.files", {"validation": str(path)})
    assert task_table.by_key("test_toy_titles") is TOY
    cfg = datasets.DatasetConfig(TOY.name, TOY.feature_lengths, "validation", 2, shuffle=False)
    evaluator = evaluation.make_evaluator(cfg, str(tmp_path / "eval"))

    def predict_the_targets(dataset, model_feature_shapes=None):
        return [(int(i), f["decoder_target_tokens"].tolist()) for i, f in dataset.as_numpy_iterator()]

    all_metrics, _ = evaluator.evaluate(
        compute_metrics=True, step=0, predict_fn=predict_the_targets
    )
    results = all_metrics.result()
    assert list(results) == [TOY.name]
    assert results[TOY.name]["rouge1"] == pytest.approx(100.0)
    # The trainer picks the best checkpoint by the table's primary metric.
    assert best_checkpoint.default_eval_metric([TOY.name]) == "gqa_test_toy_titles/rouge1"


def test_registering_the_same_task_again_replaces_it():
    tasks.register_task(TOY)
    again = dataclasses.replace(TOY, feature_lengths={"inputs": 32, "targets": 8})
    tasks.register_task(again)
    assert task_table.feature_lengths("test_toy_titles") == {"inputs": 32, "targets": 8}
    tasks.register_task(TOY)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "gqa_toy_other", "key": "cnn_dailymail"}, r"clashes with .*'gqa_cnn_dailymail'"),
        ({"name": "gqa_eval_mixture", "key": "toy_mixture"}, "evaluation mixture"),
        (
            {"name": "gqa_toy_other", "key": "toy_other",
             "source": SourceSpec("register_task", {"body": False})},
            "would shadow gqa_t5x.data.tasks.register_task",
        ),
    ],
)
def test_registering_a_task_that_clashes_is_an_error(changes, message):
    with pytest.raises(ValueError, match=message):
        tasks.register_task(dataclasses.replace(TOY, **changes))
    assert "gqa_toy_other" not in [s.name for s in task_table.task_specs()]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"feature_lengths": {"inputs": 64}}, r"feature_lengths=\{'inputs': 64\}"),
        ({"key": "gqa-toy"}, "TaskSpec.key='gqa-toy' must be a non-empty identifier"),
        ({"metric_fns": ()}, "primary_metric='rouge1' but the task has no metric_fns"),
    ],
)
def test_an_inconsistent_task_spec_is_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TOY, **changes)


def test_a_task_without_a_gin_file_says_what_to_add():
    tasks.register_task(TOY)
    with pytest.raises(KeyError, match="has no gin file"):
        task_table.gin_file(TOY.name)
