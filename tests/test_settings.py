"""Settings: read from DOCFLOW_* variables, and every one documented in the README."""

from __future__ import annotations

import re

from pipeline.settings import REPO_ROOT, Settings


def test_settings_are_read_from_docflow_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCFLOW_KAFKA_PORT", "19999")
    monkeypatch.setenv("DOCFLOW_TOPIC_PARTITIONS", "3")
    monkeypatch.setenv("DOCFLOW_HOME", str(tmp_path))
    settings = Settings()
    assert settings.bootstrap_servers == "127.0.0.1:19999"
    assert settings.topic_partitions == 3
    assert settings.objects_url == (tmp_path / "objects").as_uri()


def test_every_setting_is_in_the_readme_configuration_table():
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(DOCFLOW_[A-Z0-9_]+)` \|", readme, re.MULTILINE))
    assert documented == {f"DOCFLOW_{name.upper()}" for name in Settings.model_fields}
