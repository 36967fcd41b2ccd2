"""Tests of the registered seqio tasks: mocked TFDS, local files, bad data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from gqa_t5x.data import errors
from gqa_t5x.data import task_table
from gqa_t5x.data import tasks  # noqa: F401 (registers the tasks)
from gqa_t5x.data.errors import DataError

from paths import REPO

TFDS_TASKS = [s.name for s in task_table.BUILTIN_TASKS if s.source.tfds_name]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def vocab(shared_dir):
    path = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    gin.bind_parameter("gqa_t5x.data.vocabularies.vocabulary_path.path", str(path))
    return path


def _bind(name: str, **arguments) -> None:
    for argument, value in arguments.items():
        gin.bind_parameter(f"gqa_t5x.data.tasks.{name}.{argument}", value)


def _examples(task: str, split: str = "validation", lengths=None, limit=None):
    lengths = lengths or task_table.feature_lengths(task)
    ds = seqio.get_mixture_or_task(task).get_dataset(
        lengths, split=split, shuffle=False, seed=0
    )
    if limit:
        ds = ds.take(limit)
    with errors.surface_data_errors():
        return list(ds.as_numpy_iterator())


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------- registration --------------------------------


def test_every_builtin_task_and_the_eval_mixture_are_registered_with_paper_lengths():
    lengths = {s.name: dict(s.feature_lengths) for s in task_table.BUILTIN_TASKS}
    assert lengths == {
        "gqa_c4_span_corruption": {"inputs": 512, "targets": 114},
        "gqa_corpus_span_corruption": {"inputs": 512, "targets": 114},
        "gqa_cnn_dailymail": {"inputs": 512, "targets": 256},
        "gqa_arxiv": {"inputs": 2048, "targets": 512},
        "gqa_pubmed": {"inputs": 2048, "targets": 512},
        "gqa_mediasum": {"inputs": 2048, "targets": 512},
        "gqa_multi_news": {"inputs": 2048, "targets": 512},
        "gqa_wmt14_ende": {"inputs": 512, "targets": 256},
        "gqa_triviaqa": {"inputs": 2048, "targets": 32},
    }
    for name in lengths:
        assert name in seqio.TaskRegistry.names()
    mixture = seqio.get_mixture_or_task(task_table.EVAL_MIXTURE)
    assert sorted(t.name for t in mixture.tasks) == sorted(task_table.EVAL_MIXTURE_TASKS)
    assert len(mixture.tasks) == 7
    assert task_table.feature_lengths(task_table.EVAL_MIXTURE) == {
        "inputs": 2048,
        "targets": 512,
    }


@pytest.mark.parametrize("gin_file", sorted((REPO / "gin" / "tasks").glob("*.gin")))
def test_task_gin_files_parse_and_name_registered_tasks(gin_file, monkeypatch):
    monkeypatch.chdir(REPO)  # Includes are relative to the repository root.
    gin.parse_config_file(str(gin_file))
    if gin_file.name == "shared_data.gin":
        assert gin.query_parameter("%VOCAB_PATH").endswith("sentencepiece.model")
        return
    name = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == task_table.feature_lengths(name)


@pytest.mark.parametrize("spec", task_table.BUILTIN_TASKS, ids=lambda s: s.key)
def test_the_gin_file_of_every_table_task_names_that_task(spec, monkeypatch):
    monkeypatch.chdir(REPO)
    gin.parse_config_file(str(REPO / task_table.gin_file(spec.key)))
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == spec.name


def test_shared_data_gin_runs_tasks_offline_from_the_repository_root(monkeypatch):
    if not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("../shared is not next to the repository")
    monkeypatch.chdir(REPO)
    gin.parse_config_file(str(REPO / "gin" / "tasks" / "shared_data.gin"))
    for task in ("gqa_cnn_dailymail", "gqa_wmt14_ende", "gqa_triviaqa"):
        examples = _examples(task, limit=2)
        assert len(examples) == 2 and examples[0]["targets"][-1] == 1
    c4 = _examples("gqa_c4_span_corruption", limit=1)
    assert len(c4[0]["inputs"]) == 512


# ---------------------------- data locations in gin ---------------------------

# `tasks.<name>.` or `gqa_t5x.data.tasks.<name>.` in a gin file (bindings and
# the examples in comments alike).
_TASKS_REFERENCE = re.compile(r"(?<![\w/])(?:gqa_t5x\.data\.)?tasks\.([A-Za-z_]\w*)\.")


def _gin_files():
    return sorted(p for folder in ("gin", "configs") for p in (REPO / folder).rglob("*.gin"))


def test_every_builtin_location_is_defined_by_name_in_the_module_source():
    source = Path(tasks.__file__).read_text()
    locations = {s.source.location for s in task_table.BUILTIN_TASKS}
    assert len(locations) == 9
    for location in sorted(locations):
        # Greppable: `cnn_dailymail_data = define_location("cnn_dailymail_data")`.
        assert re.search(rf'^{location} = define_location\("{location}"\)$', source, re.M), location
        configurable = getattr(tasks, location)
        assert gin.get_configurable(f"gqa_t5x.data.tasks.{location}") is configurable
        assert location in tasks.__doc__
    assert "setattr" not in source


def test_every_tasks_configurable_a_gin_file_references_exists():
    referenced = {}
    for path in _gin_files():
        for name in _TASKS_REFERENCE.findall(path.read_text()):
            referenced.setdefault(name, path.relative_to(REPO).as_posix())
    assert {"c4_data", "cnn_dailymail_data", "corpus_data", "mediasum_data"} <= set(referenced)
    for name, where in sorted(referenced.items()):
        assert callable(getattr(tasks, name, None)), f"{where} references tasks.{name}"
        gin.get_configurable(f"gqa_t5x.data.tasks.{name}")  # raises when unknown


def test_configs_binding_locations_through_dynamic_registration_parse(monkeypatch):
    monkeypatch.chdir(REPO)
    gin.parse_config_file(str(REPO / "configs" / "finetune_cnn_sample.gin"))
    assert tasks.cnn_dailymail_data().files["train"].endswith("validation.jsonl")


def test_define_location_registers_a_configurable_without_adding_module_names():
    name = "test_only_defined_data"
    location = tasks.define_location(name)
    assert tasks.define_location(name) is location
    assert not hasattr(tasks, name)
    gin.bind_parameter(f"gqa_t5x.data.tasks.{name}.files", {"validation": "/data/x.jsonl"})
    assert location().files == {"validation": "/data/x.jsonl"}
    with pytest.raises(ValueError, match="would shadow gqa_t5x.data.tasks.define_location"):
        tasks.define_location("define_location")


# ------------------------------ TFDS (mocked) --------------------------------


@pytest.mark.parametrize("task", [  # the fast tier: one span-corruption and one summarization task
    pytest.param(t, marks=() if t in ("gqa_c4_span_corruption", "gqa_cnn_dailymail") else pytest.mark.slow)
    for t in TFDS_TASKS])
def test_tfds_task_runs_its_whole_chain_under_mock_data(task, vocab):
    lengths = task_table.feature_lengths(task)
    split = "train" if task == "gqa_c4_span_corruption" else "validation"
    with tfds.testing.mock_data(num_examples=16, num_sub_examples=3):
        ds = seqio.get_mixture_or_task(task).get_dataset(
            lengths, split=split, shuffle=False, seed=0
        )
        examples = list(ds.as_numpy_iterator())
        converted = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
        batch = next(iter(converted.as_numpy_iterator()))
    assert examples
    for ex in examples:
        for key in ("inputs", "targets"):
            assert ex[key].dtype == np.int32
            assert 2 <= len(ex[key]) <= lengths[key]
            assert ex[key][-1] == 1  # EOS
    assert batch["encoder_input_tokens"].shape == (lengths["inputs"],)
    assert batch["decoder_target_tokens"].shape == (lengths["targets"],)


@pytest.mark.slow
def test_eval_mixture_yields_examples_under_mock_data(vocab, tmp_path):
    mediasum = _write_jsonl(
        tmp_path / "mediasum.jsonl",
        [{"utt": ["Hi.", "Hello."], "speaker": ["A", "B"], "summary": "Greeting."}],
    )
    _bind("mediasum_data", files={"validation": mediasum})
    lengths = task_table.feature_lengths(task_table.EVAL_MIXTURE)
    with tfds.testing.mock_data(num_examples=4, num_sub_examples=2):
        ds = seqio.get_mixture_or_task(task_table.EVAL_MIXTURE).get_dataset(
            lengths, split="validation", shuffle=False, seed=0
        )
        examples = list(ds.take(20).as_numpy_iterator())
    assert len(examples) == 20
    assert all(
        len(ex["inputs"]) <= 2048 and len(ex["targets"]) <= 512 for ex in examples
    )


# ---------------------------- local files, real data --------------------------


def test_cnn_dailymail_local_jsonl_end_to_end_with_rouge(vocab, shared_dir):
    path = shared_dir / "data" / "cnn_dailymail" / "validation.jsonl"
    rows = [json.loads(line) for line in path.open()]
    _bind("cnn_dailymail_data", files={"validation": str(path)})
    task = seqio.get_mixture_or_task("gqa_cnn_dailymail")
    examples = _examples("gqa_cnn_dailymail")
    assert len(examples) == len(rows) == 668
    vocabulary = task.output_features["inputs"].vocabulary
    truncated = 0
    for ex, row in zip(examples, rows):
        assert ex["inputs_pretokenized"].decode() == "summarize: " + row["article"]
        assert ex["targets_pretokenized"].decode() == row["highlights"]
        # Tokens are kept up to 511, then EOS: never longer, never cut shorter.
        tokens = vocabulary.encode_tf("summarize: " + row["article"]).numpy().tolist()
        assert ex["inputs"].tolist() == tokens[:511] + [1]
        truncated += len(tokens) >= 512
    assert truncated > 400  # most articles are longer than the input length
    targets = [
        task.postprocess_fn(ex["targets_pretokenized"].decode()) for ex in examples
    ]
    lead3 = [
        " ".join(
            re.split(r"(?<=[.!?])\s+", ex["inputs_pretokenized"].decode()[11:])[:3]
        )
        for ex in examples
    ]
    (rouge,) = task.metric_fns
    scores = rouge(targets, lead3)
    # Lead-3 ROUGE from t5.evaluation.metrics.rouge (np.random.seed(0)).
    assert scores["rouge1"] == pytest.approx(27.465429326941127, abs=1e-9)


@pytest.mark.slow
def test_wmt_local_text_pair_end_to_end_with_bleu(vocab, shared_dir):
    folder = shared_dir / "data" / "wmt_ende"
    english = (folder / "src-val.txt").read_text().splitlines()
    german = (folder / "tgt-val.txt").read_text().splitlines()
    _bind(
        "wmt14_ende_data",
        files={
            "validation": [str(folder / "src-val.txt"), str(folder / "tgt-val.txt")]
        },
    )
    examples = _examples("gqa_wmt14_ende")
    assert len(examples) == 3000
    assert [ex["targets_pretokenized"].decode() for ex in examples] == german
    assert examples[0]["inputs_pretokenized"].decode() == (
        "translate English to German: " + english[0]
    )
    vocab_obj = (
        seqio.get_mixture_or_task("gqa_wmt14_ende")
        .output_features["targets"]
        .vocabulary
    )
    assert vocab_obj.decode(examples[0]["targets"].tolist()) == german[0]
    (bleu,) = seqio.get_mixture_or_task("gqa_wmt14_ende").metric_fns
    hypotheses = [
        " ".join(w for i, w in enumerate(t.split()) if i % 5 != 4) for t in german
    ]
    assert bleu(german, hypotheses)["bleu"] == pytest.approx(
        49.748733267465596, abs=1e-9
    )


def test_c4_task_reads_the_real_tfds_builder_dir(vocab, shared_dir):
    _bind("c4_data", tfds_builder_dir=str(shared_dir / "data" / "c4" / "en" / "3.0.1"))
    examples = _examples("gqa_c4_span_corruption")
    lengths = [(len(ex["inputs"]), len(ex["targets"])) for ex in examples]
    assert len(examples) > 100
    assert max(lengths) == (512, 114)
    assert sum(length == (512, 114) for length in lengths) >= len(examples) - 2


def test_c4_task_rejects_targets_length_that_cannot_hold_span_corruption(
    vocab, shared_dir
):
    _bind("c4_data", tfds_builder_dir=str(shared_dir / "data" / "c4" / "en" / "3.0.1"))
    with pytest.raises(ValueError, match="targets length 100"):
        _examples("gqa_c4_span_corruption", lengths={"inputs": 512, "targets": 100})


def test_triviaqa_local_jsonl_with_field_map_scores_with_all_answers(vocab, shared_dir):
    path = shared_dir / "data" / "squad" / "validation.jsonl"
    _bind(
        "triviaqa_data",
        files={"validation": str(path)},
        field_map={"answers": "answers.text"},
    )
    task = seqio.get_mixture_or_task("gqa_triviaqa")
    examples = _examples("gqa_triviaqa")
    assert len(examples) == 264
    assert examples[0]["inputs_pretokenized"].decode().startswith("question: ")
    targets = [task.postprocess_fn("", example=ex, is_target=True) for ex in examples]
    assert all(isinstance(t, list) and t for t in targets)
    predictions = [t[-1] for t in targets]  # any acceptable answer is exact
    assert task.metric_fns[0](targets, predictions)["em"] == pytest.approx(100.0)


def test_mediasum_reads_tfrecord_files(vocab, tmp_path):
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                "utt": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[b"Hi.", b"Yo."])
                ),
                "speaker": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[b"A", b"B"])
                ),
                "summary": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[b"Hello."])
                ),
            }
        )
    )
    path = str(tmp_path / "mediasum-validation.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(example.SerializeToString())
    _bind("mediasum_data", files={"validation": path})
    (ex,) = _examples("gqa_mediasum")
    assert ex["inputs_pretokenized"].decode() == "summarize: A: Hi.\nB: Yo."
    assert ex["targets_pretokenized"].decode() == "Hello."


# --------------------------------- bad data ----------------------------------


def test_missing_file_error_names_the_gin_binding(vocab, tmp_path):
    _bind("cnn_dailymail_data", files={"validation": str(tmp_path / "none*.jsonl")})
    with pytest.raises(
        FileNotFoundError, match=r"cnn_dailymail_data\.files.*matches no file"
    ):
        _examples("gqa_cnn_dailymail")


def test_wrong_field_name_error_names_file_line_and_field(vocab, tmp_path):
    path = _write_jsonl(tmp_path / "cnn.jsonl", [{"story": "x", "highlights": "y"}])
    _bind("cnn_dailymail_data", files={"validation": path})
    with pytest.raises(
        DataError, match=r"cnn\.jsonl:1: field 'article'.*tasks\.cnn_dailymail_data\.field_map"
    ):
        _examples("gqa_cnn_dailymail")


def test_wrong_field_name_in_tfrecord_lists_the_fields_it_has(vocab, tmp_path):
    path = str(tmp_path / "c4.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"t"]))
        writer.write(
            tf.train.Example(
                features=tf.train.Features(feature={"content": feature})
            ).SerializeToString()
        )
    _bind("c4_data", files={"train": path})
    with pytest.raises(DataError, match=r"feature 'text'.*\['content'\]"):
        _examples("gqa_c4_span_corruption", split="train")


def test_bad_record_after_the_first_fails_with_its_line_number(vocab, tmp_path):
    path = tmp_path / "cnn.jsonl"
    path.write_text(json.dumps({"article": "a", "highlights": "b"}) + "\n{not json\n")
    _bind("cnn_dailymail_data", files={"validation": str(path)})
    with pytest.raises(DataError, match=r"cnn\.jsonl:2: invalid JSON") as raised:
        _examples("gqa_cnn_dailymail")
    assert "Traceback" not in str(raised.value)


def test_empty_split_is_an_error_not_an_empty_dataset(vocab, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    _bind("cnn_dailymail_data", files={"validation": str(path)})
    with pytest.raises(DataError, match="split is empty"):
        _examples("gqa_cnn_dailymail")


def test_empty_text_pair_files_are_an_error(vocab, tmp_path):
    (tmp_path / "en.txt").write_text("")
    (tmp_path / "de.txt").write_text("")
    _bind(
        "wmt14_ende_data",
        files={"validation": [str(tmp_path / "en.txt"), str(tmp_path / "de.txt")]},
    )
    with pytest.raises(DataError, match="no pairs"):
        _examples("gqa_wmt14_ende")


def test_misaligned_text_pairs_are_an_error(vocab, tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\n")
    (tmp_path / "de.txt").write_text("a\n")
    _bind(
        "wmt14_ende_data",
        files={"validation": [str(tmp_path / "en.txt"), str(tmp_path / "de.txt")]},
    )
    with pytest.raises(DataError, match="line-aligned"):
        _examples("gqa_wmt14_ende")


def test_split_without_files_is_an_error(vocab, tmp_path):
    path = _write_jsonl(tmp_path / "cnn.jsonl", [{"article": "a", "highlights": "b"}])
    _bind("cnn_dailymail_data", files={"validation": path})
    with pytest.raises(ValueError, match=r"No files for split 'train'"):
        _examples("gqa_cnn_dailymail", split="train")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"files": {"dev": "x.jsonl"}}, r"unknown split\(s\) \['dev'\]"),
        ({"files": {"validation": "x.jsonl"}, "tfds_data_dir": "/d"}, "Set only one"),
        ({"field_map": {"story": "text"}}, r"unknown field\(s\) \['story'\]"),
        ({"files": {"validation": "x.txt"}}, "file_format"),
    ],
)
def test_inconsistent_location_settings_are_rejected(vocab, arguments, message):
    _bind("cnn_dailymail_data", **arguments)
    with pytest.raises(ValueError, match=message):
        _examples("gqa_cnn_dailymail")


@pytest.mark.parametrize("arguments", [{}, {"tfds_data_dir": "/data/tfds"}])
def test_mediasum_without_files_says_how_to_configure_it(vocab, arguments):
    _bind("mediasum_data", **arguments)
    with pytest.raises(ValueError, match=r"not in TFDS.*mediasum_data\.files"):
        _examples("gqa_mediasum")


def test_field_of_the_wrong_type_is_an_error(vocab, tmp_path):
    path = _write_jsonl(tmp_path / "cnn.jsonl", [{"article": ["a"], "highlights": "b"}])
    _bind("cnn_dailymail_data", files={"validation": path})
    with pytest.raises(
        DataError, match=r"cnn\.jsonl:1: field 'article' must be a string, not list"
    ):
        _examples("gqa_cnn_dailymail")


def test_unprepared_tfds_data_dir_is_an_error_naming_the_binding(vocab, tmp_path):
    _bind("cnn_dailymail_data", tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"cnn_dailymail_data\.tfds_data_dir"):
        _examples("gqa_cnn_dailymail")
