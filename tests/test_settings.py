"""Settings: read from DOCFLOW_* variables, and every one documented in the README."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

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


def test_a_dotenv_file_in_the_working_directory_is_read_and_the_environment_wins(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("DOCFLOW_WEB_PORT=7077\nDOCFLOW_CHUNK_SIZE=99\nOTHER_TOOL_SETTING=ignored\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DOCFLOW_WEB_PORT", raising=False)
    monkeypatch.setenv("DOCFLOW_CHUNK_SIZE", "120")
    settings = Settings()
    assert settings.web_port == 7077
    assert settings.chunk_size == 120


def test_a_default_company_must_be_a_valid_company_id(monkeypatch):
    monkeypatch.setenv("DOCFLOW_DEFAULT_COMPANY_ID", "../other")
    with pytest.raises(ValidationError, match="default_company_id"):
        Settings()
