"""The path layer without an emulator: client settings, whole-file writes, walk.

(tests/storage/test_gcs_emulator.py runs the same functions on gs://.)
"""

from __future__ import annotations

import os

import fsspec
import pytest

from gqa_t5x import launcher
from gqa_t5x.storage import deadlines, paths

# The clients' timeout settings under the default policy (120 s, 3 retries).
TIMEOUT_ENVIRON = deadlines.client_environment(deadlines.Policy())


@pytest.fixture
def clean_settings(monkeypatch):
    """No emulator or storage-policy variables, none of the clients' timeout
    variables, and fsspec's gcs options restored afterwards."""
    for key in ("STORAGE_EMULATOR_HOST", "EPATH_USE_TF", "TENSORSTORE_GCS_HTTP_URL",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", deadlines.TIMEOUT_VAR, deadlines.RETRIES_VAR,
                deadlines.BACKOFF_VAR, paths.APPLIED_VAR, *TIMEOUT_ENVIRON):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(fsspec.config.conf, "gcs", {})
    return monkeypatch


def test_an_emulator_host_points_every_gs_client_at_it_unless_set_otherwise(clean_settings):
    clean_settings.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    clean_settings.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true")  # the user's choice wins
    applied = paths.configure_clients()
    assert applied == {"EPATH_USE_TF": "false", "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:4443", **TIMEOUT_ENVIRON}
    assert os.environ["EPATH_USE_TF"] == "false" and os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "true"
    assert fsspec.config.conf["gcs"] == {"use_listings_cache": False, "token": "anon", "requests_timeout": 120.0}
    assert paths.configure_clients() == {}  # idempotent


def test_real_gcs_keeps_the_ecosystem_defaults_but_bounds_every_wait(clean_settings):
    assert paths.emulator_host() is None
    assert paths.configure_clients() == TIMEOUT_ENVIRON
    assert "EPATH_USE_TF" not in os.environ and "TENSORSTORE_GCS_HTTP_URL" not in os.environ
    # No cached listings (tensorstore, Orbax and other hosts write the same
    # directories), and a gcsfs request may take 120 s (gcsfs: no limit).
    assert fsspec.config.conf["gcs"] == {"use_listings_cache": False, "requests_timeout": 120.0}
    assert os.environ["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"] == "120"
    assert os.environ["GCS_REQUEST_IDLE_TIMEOUT_SECS"] == "120" and os.environ["GCS_RETRY_CONFIG_MAX_RETRIES"] == "3"


def test_the_storage_policy_reaches_the_clients_and_the_users_own_settings_win(clean_settings):
    clean_settings.setenv(deadlines.TIMEOUT_VAR, "7.5")
    clean_settings.setenv(deadlines.RETRIES_VAR, "1")
    clean_settings.setenv("GCS_REQUEST_IDLE_TIMEOUT_SECS", "600")  # the user's choice
    paths.configure_clients()
    assert fsspec.config.conf["gcs"]["requests_timeout"] == 7.5
    assert os.environ["TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS"] == "8"  # whole seconds, rounded up
    assert os.environ["GCS_RETRY_CONFIG_MAX_RETRIES"] == "1"
    assert os.environ["GCS_REQUEST_IDLE_TIMEOUT_SECS"] == "600"
    # A changed policy replaces what configure_clients set, never the user's values.
    clean_settings.setenv(deadlines.TIMEOUT_VAR, "30")
    assert paths.configure_clients() == {k: "30" for k in TIMEOUT_ENVIRON if k.endswith(("_SECS", "_SECONDS"))
                                         and k != "GCS_REQUEST_IDLE_TIMEOUT_SECS"}
    assert fsspec.config.conf["gcs"]["requests_timeout"] == 30.0
    assert os.environ["GCS_REQUEST_IDLE_TIMEOUT_SECS"] == "600"
    # An invalid value leaves the clients alone here; the first gs:// access reports it.
    clean_settings.setenv(deadlines.TIMEOUT_VAR, "soon")
    assert paths.configure_clients() == {}


def test_a_child_process_with_another_policy_replaces_the_inherited_client_settings(clean_settings):
    # What a child of a gqa_t5x process inherits: the parent's settings, listed as its own...
    clean_settings.setenv("GCS_REQUEST_IDLE_TIMEOUT_SECS", "120")
    clean_settings.setenv("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "120")
    clean_settings.setenv(paths.APPLIED_VAR, '{"GCS_REQUEST_IDLE_TIMEOUT_SECS": "120"}')
    clean_settings.setattr(paths, "_applied_environ", {})  # a fresh process
    clean_settings.setenv(deadlines.TIMEOUT_VAR, "5")
    applied = paths.configure_clients()
    assert os.environ["GCS_REQUEST_IDLE_TIMEOUT_SECS"] == "5" == applied["GCS_REQUEST_IDLE_TIMEOUT_SECS"]
    # ...while a value not listed there is the user's, and kept.
    assert os.environ["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"] == "120"
    assert "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS" not in applied


def test_local_files_are_replaced_whole_and_an_interrupted_write_changes_nothing(tmp_path):
    target = tmp_path / "run" / "metrics.json"
    paths.replace_file(target, "old")  # creates run/
    with pytest.raises(RuntimeError, match="interrupted"):
        with paths.replacing(target) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(target.parent) == ["metrics.json"]
    with paths.replacing(target, "wb") as f:
        f.write(b"\xce\xbb")
    assert target.read_text(encoding="utf-8") == "λ" and os.listdir(target.parent) == ["metrics.json"]
    with pytest.raises(ValueError, match="mode='a'"):
        with paths.replacing(target, "a"):
            pass


def test_walk_lists_a_tree_top_down_and_can_skip_directories(tmp_path):
    for name in ("a/results.json", "a/checkpoint_5/results.json", "b/c/results.json"):
        paths.replace_file(tmp_path / name, "{}")
    seen = []
    for root, dirs, files in paths.walk(tmp_path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("checkpoint_"))
        seen += [os.path.relpath(os.fspath(root / f), tmp_path) for f in files]
    assert sorted(seen) == ["a/results.json", "b/c/results.json"]


def test_write_config_keeps_the_previous_launch_and_names_the_macro(tmp_path):
    launcher.write_config(str(tmp_path), "A = 1\n")
    launcher.write_config(str(tmp_path), "A = 1\n")  # unchanged: nothing kept
    assert sorted(os.listdir(tmp_path)) == ["config.gin"]
    launcher.write_config(str(tmp_path), "A = 2\n")
    kept = sorted(p for p in os.listdir(tmp_path) if p != "config.gin")
    assert len(kept) == 1 and (tmp_path / kept[0]).read_text() == "A = 1\n"
    assert (tmp_path / "config.gin").read_text() == "A = 2\n"
    with pytest.raises(ValueError, match="MODEL_DIR is empty"):
        launcher.write_config("", "A = 1\n", name="MODEL_DIR")
