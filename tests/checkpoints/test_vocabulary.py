"""The vocabulary recorded in checkpoints, checked, and exported for HuggingFace.

The export must be usable by HuggingFace alone: `AutoTokenizer` +
`AutoModelForSeq2SeqLM` loaded from the export directory, offline, tokenise
as seqio does and generate the tokens our greedy decoder generates.
"""

from __future__ import annotations

import json
import shutil

import gin
import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x import cli
from gqa_t5x.data import vocabularies
from gqa_t5x.model import decoding
from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config
from gqa_t5x.training import train_state as ts

VOCAB_RELATIVE = "fixtures/t5_vocab/cc_all.32000.sentencepiece.model"
CONFIG = T5Config(vocab_size=32128, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_encoder_layers=2,
                  num_decoder_layers=2, dtype="float32", num_kv_heads=2)


@pytest.fixture
def spm(shared_dir, tmp_path):
    path = tmp_path / "spiece.model"
    shutil.copy(shared_dir / VOCAB_RELATIVE, path)
    return path


def test_a_record_names_the_file_and_its_hash_and_a_changed_file_is_refused(spm):
    entry = checkpoints.vocabulary.record(str(spm))
    assert entry["path"] == str(spm) and entry["extra_ids"] == 100 and len(entry["sha256"]) == 64
    assert checkpoints.vocabulary.read_model(entry, source="ckpt") == spm.read_bytes()
    spm.write_bytes(spm.read_bytes() + b"x")
    with pytest.raises(checkpoints.CheckpointError, match=r"ckpt was written with the vocabulary .* now has sha256"):
        checkpoints.vocabulary.read_model(entry, source="ckpt")


@pytest.mark.slow
def test_convert_records_the_vocabulary_and_a_second_conversion_keeps_it(spm, tmp_path):
    checkpoints.save(tmp_path / "mha", CONFIG.replace(num_kv_heads=4), initialization.init_params(
        CONFIG.replace(num_kv_heads=4), seed=0), step=5)
    assert cli.main(["convert", "--source", str(tmp_path / "mha"), "--output", str(tmp_path / "gqa"),
                     "--num_kv_heads", "2", "--vocab", str(spm), "--no_progress"]) == 0
    with checkpoints.open_checkpoint(tmp_path / "gqa") as reader:
        assert reader.metadata["vocabulary"] == checkpoints.vocabulary.record(str(spm))
    assert cli.main(["convert", "--source", str(tmp_path / "gqa"), "--output", str(tmp_path / "mqa"),
                     "--num_kv_heads", "1", "--no_progress"]) == 0
    with checkpoints.open_checkpoint(tmp_path / "mqa") as reader:
        assert reader.metadata["vocabulary"]["path"] == str(spm)


@pytest.mark.slow
def test_a_training_checkpoint_records_the_vocabulary_and_readers_see_it(spm, tmp_path):
    import jax
    import jax.numpy as jnp

    from gqa_t5x.model import models
    from gqa_t5x.training import optimizers
    from gqa_t5x.training import trainer

    vocab = vocabularies.get_vocabulary(str(spm))
    model = models.EncoderDecoderModel(network.Transformer(CONFIG), input_vocabulary=vocab,
                                       output_vocabulary=vocab)
    entry = trainer._vocabulary_record(model)
    assert entry == checkpoints.vocabulary.record(str(spm))
    params = model.get_initial_params(jax.random.PRNGKey(0))
    state = ts.TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state=optimizers.adafactor().init(params))
    manager = ts.checkpoint_manager(tmp_path / "run", async_save=False)
    ts.save(manager, state, ts.metadata_for(CONFIG, data_start_step=0, batch_size=2, task="t", seed=0,
                                            vocabulary=entry))
    manager.close()
    with checkpoints.open_checkpoint(tmp_path / "run" / "checkpoint_3") as reader:
        assert reader.metadata["vocabulary"] == entry and reader.metadata["batch_size"] == 2


def test_eval_and_infer_take_the_recorded_vocabulary_when_vocab_path_is_none():
    entry = {"path": "/recorded/spiece.model", "sha256": "0" * 64, "extra_ids": 100}
    gin.clear_config()
    try:
        assert vocabularies.use_checkpoint_vocabulary(lambda: entry, "ckpt") is None  # Unbound: untouched.
        gin.parse_config("from __gin__ import dynamic_registration\nfrom gqa_t5x.data import vocabularies\n"
                         "VOCAB_PATH = None\nvocabularies.vocabulary_path.path = %VOCAB_PATH\n")
        assert vocabularies.use_checkpoint_vocabulary(lambda: entry, "ckpt") == "/recorded/spiece.model"
        assert vocabularies.vocabulary_path() == "/recorded/spiece.model"
        gin.bind_parameter("%VOCAB_PATH", None)
        gin.bind_parameter(vocabularies.PATH_BINDING, None)
        with pytest.raises(ValueError, match=r"CHECKPOINT_PATH=ckpt records no vocabulary .* VOCAB_PATH is None"):
            vocabularies.use_checkpoint_vocabulary(lambda: None, "ckpt")
        gin.bind_parameter(vocabularies.PATH_BINDING, "/given.model")
        assert vocabularies.use_checkpoint_vocabulary(lambda: pytest.fail("read"), "ckpt") == "/given.model"
    finally:
        gin.clear_config()


def test_export_without_a_known_vocabulary_is_refused_before_writing(tmp_path, capsys):
    checkpoints.save(tmp_path / "ckpt", CONFIG, initialization.init_params(CONFIG, seed=0), step=5)
    out = tmp_path / "hf"
    code = cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "huggingface",
                     "--output", str(out), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "records no vocabulary" in err and "--vocab" in err and "--weights_only" in err, err
    assert not out.exists()
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "huggingface",
                     "--output", str(out), "--no_progress", "--weights_only"]) == 0
    assert (out / "config.json").exists() and not (out / "spiece.model").exists()


def test_the_export_loads_in_huggingface_alone_and_generates_our_greedy_tokens(spm, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = initialization.init_params(CONFIG, seed=3)
    checkpoints.save(tmp_path / "ckpt", CONFIG, params, step=5)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "huggingface",
                     "--output", str(tmp_path / "hf"), "--vocab", str(spm), "--no_progress"]) == 0
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["extra_ids"] == 100

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    seqio_vocab = vocabularies.get_vocabulary(str(spm))
    texts = ["Hello World!", "summarize: grouped-query attention interpolates between MHA and MQA."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    for row, text in zip(batch.input_ids.tolist(), texts):  # seqio's ids, then EOS (1), then padding.
        ids = list(seqio_vocab.encode(text)) + [1]
        assert row[: len(ids)] == ids and all(t == 0 for t in row[len(ids):])
    assert tokenizer.convert_ids_to_tokens([32099, 32000]) == ["<extra_id_0>", "<extra_id_99>"]

    with torch.no_grad():
        hf = model.generate(**batch, max_new_tokens=6, do_sample=False, num_beams=1, min_new_tokens=6)
    ours = decoding.decode(CONFIG, params, batch.input_ids.numpy().astype(np.int32),
                           decoding.DecodingSpec(max_decode_length=6))
    np.testing.assert_array_equal(hf[:, 1:].numpy(), np.asarray(ours.tokens)[:, :6])
