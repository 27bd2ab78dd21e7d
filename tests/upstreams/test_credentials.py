"""An upstream's password from a variable (``password_env``): a CI secret withheld from a
fork's pull request means anonymous pulls and a warning, not a cache that will not start; a
variable that is missing is a configuration error, and a token pasted where the variable's
name belongs is never echoed back into a CI log."""

from __future__ import annotations

from pathlib import Path

import pytest

from moorage.config import ConfigError, UpstreamSettings, load_settings
from moorage.upstreams import read_password

TOKEN_BY_MISTAKE = "dckr_pat_a1b2c3d4e5f6g7h8i9"


def hub(password_env: str) -> UpstreamSettings:
    return UpstreamSettings(host="docker.io", url="https://hub.example", username="ci", password_env=password_env)


def test_the_password_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKERHUB_TOKEN", " s3cret\n")
    assert read_password(0, hub("DOCKERHUB_TOKEN")) == "s3cret"


def test_an_empty_variable_means_anonymous_pulls_and_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DOCKERHUB_TOKEN", "")
    assert read_password(0, hub("DOCKERHUB_TOKEN")) is None
    [warned] = [r for r in caplog.records if getattr(r, "event", "") == "upstream_password_empty"]
    assert warned.levelname == "WARNING" and warned.__dict__["variable"] == "DOCKERHUB_TOKEN"
    caplog.clear()
    assert read_password(0, hub("DOCKERHUB_TOKEN"), warn=False) is None  # the start-up check: serving warns once
    assert not [r for r in caplog.records if getattr(r, "event", "") == "upstream_password_empty"]


def test_a_missing_variable_is_a_configuration_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKERHUB_TOKEN", raising=False)
    with pytest.raises(ConfigError) as caught:
        read_password(2, hub("DOCKERHUB_TOKEN"))
    assert "upstreams[2].password_env: the environment variable DOCKERHUB_TOKEN is not set" in str(caught.value)


def test_a_token_written_where_the_name_belongs_is_not_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TOKEN_BY_MISTAKE, raising=False)
    with pytest.raises(ConfigError) as caught:
        read_password(0, hub(TOKEN_BY_MISTAKE))
    assert "upstreams[0].password_env" in str(caught.value) and TOKEN_BY_MISTAKE not in str(caught.value)
    settings = tmp_path / "config.yaml"  # with a character no variable's name has
    settings.write_text(
        f"upstreams:\n  - {{host: a.io, url: 'https://a.io', username: u, password_env: {TOKEN_BY_MISTAKE}-x}}\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_settings(settings)
    assert "upstreams[0].password_env" in str(refused.value) and TOKEN_BY_MISTAKE not in str(refused.value)
