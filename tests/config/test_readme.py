"""The README's configuration examples load as written, and its full example states the defaults:
a user copies them, and the table of keys is checked against the same model."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from moorage.config import DEFAULT_UPSTREAMS, Settings, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def settings_blocks() -> list[str]:
    """The YAML examples of Moorage's own settings (not the clients' or CI's): those naming
    any of its top-level keys, so that one with a misspelt key beside them is loaded, and
    fails, instead of being passed over."""
    keys = set(Settings.model_fields)
    return [text for text in blocks("yaml") if set(yaml.safe_load(text)) & keys]


def loadable(text: str, tmp_path: Path) -> Path:
    """The example as a file, with the files it names made under ``tmp_path`` (empty, or the
    README's own lifecycle policy for a ``.json``)."""
    policy = next(text for text in blocks("json") if '"rulePriority"' in text)
    for name in set(re.findall(r"/etc/moorage/[\w./-]+", text)):
        made = tmp_path / name.lstrip("/")
        made.parent.mkdir(parents=True, exist_ok=True)
        made.write_text(policy if name.endswith(".json") else "")
        text = text.replace(name, str(made))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_settings_examples_load(tmp_path: Path) -> None:
    examples = settings_blocks()
    assert len(examples) >= 2, "the full example and the access policy's"
    for number, text in enumerate(examples):
        load_settings(loadable(text, tmp_path / str(number)))  # a ConfigError fails the test


def test_the_full_example_states_every_default(tmp_path: Path) -> None:
    (full,) = [text for text in settings_blocks() if "upstreams:" in text]
    example = load_settings(loadable(full, tmp_path))
    defaults = Settings()
    assert example.model_dump(exclude={"upstreams"}) == defaults.model_dump(exclude={"upstreams"})
    written = {upstream.host: upstream for upstream in example.upstreams}
    for upstream in DEFAULT_UPSTREAMS:
        if upstream.host in written:
            assert written[upstream.host] == upstream, upstream.host
