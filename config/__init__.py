"""Configuration: one typed settings model, read from a YAML file and ``MOORAGE_*`` variables.

Imported by every room; imports none of them. ``load_settings`` builds a frozen
:class:`Settings` once at start-up; each room is handed only its own section.
"""

from ._files import NO_FILE, FileStamp, UnreadableFile, file_stamp, read_text
from ._lifecycle import LifecyclePolicy, LifecyclePolicyError, LifecycleRule, Selection, load_lifecycle_policy
from ._load import CONFIG_ENV, ConfigError, load_settings, settings_source
from ._model import (
    DEFAULT_UPSTREAMS,
    AuthSettings,
    LifecycleBinding,
    PolicyRule,
    RetrySettings,
    Settings,
    StorageSettings,
    TimeoutSettings,
    TlsSettings,
    UpstreamSettings,
    split_address,
)
from ._units import duration_text, parse_duration, parse_size, size_text

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_UPSTREAMS",
    "NO_FILE",
    "AuthSettings",
    "ConfigError",
    "FileStamp",
    "LifecycleBinding",
    "LifecyclePolicy",
    "LifecyclePolicyError",
    "LifecycleRule",
    "PolicyRule",
    "RetrySettings",
    "Selection",
    "Settings",
    "StorageSettings",
    "TimeoutSettings",
    "TlsSettings",
    "UnreadableFile",
    "UpstreamSettings",
    "duration_text",
    "file_stamp",
    "load_lifecycle_policy",
    "load_settings",
    "parse_duration",
    "parse_size",
    "read_text",
    "settings_source",
    "size_text",
    "split_address",
]
