"""Building the settings: the YAML file, then ``MOORAGE_*`` environment overrides.

Nothing else in Moorage reads the config file, and nothing else reads ``os.environ`` but for
the variable an upstream's ``password_env`` names (``upstreams/_pool.py``), the proxy variables
(``upstreams/_client.py``) and ``SSL_CERT_FILE``/``SSL_CERT_DIR`` (``upstreams/_trust.py``). An override's name is
``MOORAGE_`` plus the key path joined with ``__`` (``MOORAGE_STORAGE__PATH``,
``MOORAGE_UPSTREAMS__0__USERNAME``). Every problem becomes one :class:`ConfigError` whose
lines name the file (or variable) and the key, e.g. ``upstreams[1].url: not a URL``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ._describe import describe_error, without_echoes
from ._files import UnreadableFile, read_text
from ._model import DEFAULT_UPSTREAMS, DURATION_KEYS, SKIP_FILES, SKIP_POLICIES, Settings

__all__ = ["CONFIG_ENV", "ConfigError", "load_settings", "settings_source"]

ENV_PREFIX = "MOORAGE_"
#: Names the config file; not a setting itself.
CONFIG_ENV = "MOORAGE_CONFIG"
#: What Kubernetes sets in every pod of a namespace for a Service named ``moorage`` (or
#: ``moorage-…``), name and value: ``MOORAGE_SERVICE_HOST=10.0.0.1``,
#: ``MOORAGE_SERVICE_PORT_HTTP=5000``, ``MOORAGE_PORT=tcp://10.0.0.1:5000``,
#: ``MOORAGE_PORT_5000_TCP_PROTO=tcp``. No setting is named so (nested keys are joined with
#: ``__``), and the values' shapes keep a guess such as ``MOORAGE_PORT=8080`` an unknown key.
_ADDRESS = r"[0-9A-Fa-f.:]+"
_SERVICE_LINKS = tuple(
    (re.compile(rf"MOORAGE(_[A-Z0-9]+)*_{name}"), re.compile(value))
    for name, value in (
        ("SERVICE_HOST", _ADDRESS),
        (r"SERVICE_PORT(_[A-Z0-9]+)*", r"[0-9]+"),
        (r"PORT(_[0-9]+_(TCP|UDP|SCTP))?", rf"(tcp|udp|sctp)://(\[{_ADDRESS}\]|{_ADDRESS}):[0-9]+"),
        (r"PORT_[0-9]+_(TCP|UDP|SCTP)_PROTO", r"tcp|udp|sctp"),
        (r"PORT_[0-9]+_(TCP|UDP|SCTP)_PORT", r"[0-9]+"),
        (r"PORT_[0-9]+_(TCP|UDP|SCTP)_ADDR", _ADDRESS),
    )
)


def _is_service_link(name: str, value: str) -> bool:
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in _SERVICE_LINKS)


class ConfigError(Exception):
    """Settings that cannot be used; ``problems`` are ``key: what is wrong`` lines. ``source``
    names the file (or the environment) they came from; None where the code that found the
    problem (reading a certificate, opening the store) does not know it: see :meth:`named`."""

    def __init__(self, source: str | None, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        where = source or "the configuration"
        super().__init__(f"invalid configuration in {where}:\n" + "\n".join(f"  {p}" for p in problems))

    def named(self, source: str) -> ConfigError:
        """This error naming ``source`` (the settings' :func:`settings_source`) if it named none."""
        return self if self.source is not None else ConfigError(source, self.problems)


def _overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``MOORAGE_*`` variables that set keys."""
    return {
        name: value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and name != CONFIG_ENV and not _is_service_link(name, value)
    }


def settings_source(path: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """How errors name where settings came from: the file, the environment, both, or neither."""
    overridden = bool(_overrides(environ or {}))
    if path is None:
        return "the environment" if overridden else "the defaults"
    return f"{path} and the environment" if overridden else str(path)


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    skip_files: bool = False,
    skip_policies: bool = False,
) -> Settings:
    """The settings from ``path`` (optional) overlaid with ``environ``'s ``MOORAGE_*`` keys.
    ``skip_files``: checked away from the machine that serves them, a lifecycle policy file
    that is not there is passed over (one that is there is still checked). ``skip_policies``:
    for a command that reads each policy file where it uses it, none is read here."""
    environ = environ or {}
    data: dict[str, Any] = {}
    source = settings_source(path, environ)
    if path is not None:
        data = _read_file(path)
    overrides = _overrides(environ)
    for name in sorted(overrides):
        _apply_override(data, name, overrides[name], str(path) if path is not None else None)
    try:
        return Settings.model_validate(data, context={SKIP_FILES: skip_files, SKIP_POLICIES: skip_policies})
    except ValidationError as exc:
        raise ConfigError(
            source, [_with_variable(error, overrides) for error in without_echoes(exc.errors())]
        ) from None


def _with_variable(error: Mapping[str, Any], overrides: Mapping[str, str]) -> str:
    """The error's line, naming the ``MOORAGE_*`` variable that set the key, if one did: the
    file may not hold the key at all (``MOORAGE_TAG_TLL`` is reported as ``tag_tll``)."""
    line = describe_error(error, DURATION_KEYS)
    where = [str(part).lower() for part in error["loc"]]
    for name in sorted(overrides):
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        # A check of a whole section (``storage``'s watermarks) names the keys it is about:
        # a variable setting another key of that section is not the one to blame.
        within = path[: len(where)] == where and path[-1] in line.lower()
        if where and (where[: len(path)] == path or within):
            if error["type"] in ("tuple_type", "list_type"):
                return f"{line} (set by {name}; a variable sets one value, lists belong in the file)"
            return f"{line} (set by {name})"
    return line


class _StrictLoader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, but a key given twice in one mapping is an error
    (YAML says keys are unique; PyYAML keeps the last one without a word)."""


def _unique_keys(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults``: the loader merges it below
            continue
        key = loader.construct_object(key_node)
        try:
            mark = first.setdefault(key, key_node.start_mark)
        except TypeError:  # an unhashable key: the constructor reports it
            continue
        if mark is not key_node.start_mark:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice (first on line {mark.line + 1})", key_node.start_mark
            )
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = read_text(path)
    except UnreadableFile as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc}"]) from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except RecursionError:  # some hundreds of brackets deep: PyYAML's parser recurses
        raise ConfigError(str(path), ["not valid YAML: nested too deep"]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f"line {where.line + 1}: " if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{line}not valid YAML: {problem}"]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(str(path), [f"the file must hold a mapping of keys, not {type(loaded).__name__}"])
    return loaded


def _apply_override(data: dict[str, Any], name: str, value: str, file: str | None) -> None:
    """Set the key variable ``name`` names to ``value``, in ``data`` as read from ``file``."""
    path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
    if "" in path:
        raise ConfigError("the environment", [f"{name}: names no key (two underscores join a section and its key)"])
    node: Any = data
    for depth, key in enumerate(path[:-1]):
        section = ".".join(path[: depth + 1])
        kind = _kind_of(path[: depth + 1])
        if kind == "value":
            raise ConfigError("the environment", [f"{name}: {section} is a value, not a section of keys"])
        child = _child(node, key)
        if child is None:
            if key == "upstreams":
                child = [u.model_dump(exclude_defaults=True, mode="json") for u in DEFAULT_UPSTREAMS]
            elif kind == "list":
                problem = f"{name}: there is no {section} list to set an entry of; lists belong in the file"
                raise ConfigError("the environment", [problem])
            else:
                child = {}
            _set(node, key, child, name)
        elif not isinstance(child, dict | list):  # the file's mistake: the variable only meets it
            where = "the environment" if file is None else file
            raise ConfigError(where, [f"{section}: must be a section of keys ({name} sets a key in it)"])
        node = child
    _set(node, path[-1], value, name)


def _kind_of(path: list[str]) -> Literal["section", "list", "value"]:
    """What the key at ``path`` (lower case, list entries by number) holds, as the settings'
    model has it; a key the model does not know is taken for a section, left for the model to
    report as unknown."""
    shape: Any = Settings
    for key in path:
        shape = _without_none(shape)
        if isinstance(shape, type) and issubclass(shape, BaseModel):
            field = shape.model_fields.get(key)
            if field is None:
                return "section"
            shape = field.annotation
        elif get_origin(shape) in (tuple, list):  # a list of sections: the key is an entry's number
            shape = get_args(shape)[0]
        else:
            return "value"
    shape = _without_none(shape)
    if get_origin(shape) in (tuple, list):
        return "list"
    return "section" if isinstance(shape, type) and issubclass(shape, BaseModel) else "value"


def _without_none(shape: Any) -> Any:
    """``X`` of an optional ``X | None``; any other shape as it is."""
    if get_origin(shape) in (Union, UnionType):
        return next((arg for arg in get_args(shape) if arg is not type(None)), shape)
    return shape


def _child(node: Any, key: str) -> Any:
    if isinstance(node, list):
        return node[int(key)] if key.isdigit() and int(key) < len(node) else None
    return node.get(key)


def _set(node: Any, key: str, value: Any, name: str) -> None:
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ConfigError("the environment", [f"{name}: no list entry {key!r} to override"])
        node[int(key)] = value
    else:
        node[key] = value
