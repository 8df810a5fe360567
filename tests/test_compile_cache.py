"""training.compilation_cache_dir: which folder JAX's persistent compilation cache uses."""

import logging

import jax

from dermjax import compile_cache


def test_auto_is_the_environment_variable_when_set(monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "/shared/xla")
    assert compile_cache.resolve("auto") == "/shared/xla"


def test_auto_is_the_user_cache_folder_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.resolve("auto") == str(tmp_path / "dermjax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve("auto") == str(tmp_path / "home" / ".cache" / "dermjax" / "jax")


def test_none_or_empty_is_off_and_a_folder_is_taken_as_given(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, "/shared/xla")  # an explicit setting wins over it
    assert compile_cache.resolve(None) is None and compile_cache.resolve("") is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.resolve("~/xla") == str(tmp_path / "xla")
    assert compile_cache.resolve("gs://bucket/xla") == "gs://bucket/xla"


def _record_updates(monkeypatch) -> list:
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    return updates


def test_enable_creates_the_folder_and_points_jax_at_it(monkeypatch, tmp_path):
    updates = _record_updates(monkeypatch)
    folder = tmp_path / "a" / "b"
    assert compile_cache.enable(str(folder)) == str(folder) and folder.is_dir()
    assert updates == [("jax_compilation_cache_dir", str(folder))]
    assert compile_cache.enable(None) is None
    assert updates[-1] == ("jax_compilation_cache_dir", None)


def test_an_unwritable_folder_warns_and_the_run_goes_on_without_a_cache(
    monkeypatch, tmp_path, caplog
):
    updates = _record_updates(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        assert compile_cache.enable(str(blocker / "xla")) is None
    assert updates == [("jax_compilation_cache_dir", None)]
    assert "cannot create" in caplog.text and "training.compilation_cache_dir" in caplog.text
