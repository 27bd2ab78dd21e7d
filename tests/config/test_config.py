"""Settings: defaults with no file, the file, MOORAGE_* overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moorage.config import ConfigError, duration_text, load_settings, parse_duration, parse_size, settings_source


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_mirror_docker_hub_and_the_big_public_registries() -> None:
    settings = load_settings()
    assert settings.listen == ":5000"
    assert settings.storage.path == Path("./moorage-data")
    assert settings.tag_ttl == 900
    hosts = [u.host for u in settings.upstreams]
    assert hosts == [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
        "public.ecr.aws",
        "mcr.microsoft.com",
    ]
    default = [u for u in settings.upstreams if u.default]
    assert [u.host for u in default] == ["docker.io"]
    assert default[0].adds_library_prefix
    assert not settings.upstreams[1].adds_library_prefix


def test_file_keys_from_the_contract(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    path = write(
        tmp_path,
        f"""
listen: "127.0.0.1:6000"
storage:
  path: "{tmp_path}/data"
tag_ttl: "1h30m"
upstreams:
  - host: docker.io
    url: https://registry-1.docker.io
    default: true
    aliases: [registry-1.docker.io, index.docker.io]
    prefixes: [docker-hub]
    username: "bob"
    password_file: "{password}"
    tag_ttl: "5m"
  - host: ghcr.io
    url: https://ghcr.io/
""",
    )
    settings = load_settings(path)
    assert settings.listen_host == "127.0.0.1" and settings.listen_port == 6000
    assert settings.tag_ttl == 5400
    hub, ghcr = settings.upstreams
    assert settings.tag_ttl_of(hub) == 300 and settings.tag_ttl_of(ghcr) == 5400
    assert hub.aliases == ("registry-1.docker.io", "index.docker.io")
    assert ghcr.url == "https://ghcr.io"
    assert "s3cret" not in repr(settings)


def test_environment_overrides_scalars_and_list_entries(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 0.0.0.0:5000\n")
    settings = load_settings(
        path,
        {
            "MOORAGE_LISTEN": "127.0.0.1:7000",
            "MOORAGE_STORAGE__PATH": "/var/lib/moorage",
            "MOORAGE_TAG_TTL": "30s",
            "MOORAGE_UPSTREAMS__1__USERNAME": "octocat",
            "MOORAGE_CONFIG": str(path),
            "UNRELATED": "x",
        },
    )
    assert settings.listen == "127.0.0.1:7000"
    assert settings.storage.path == Path("/var/lib/moorage")
    assert settings.tag_ttl == 30
    assert settings.upstreams[1].host == "ghcr.io" and settings.upstreams[1].username == "octocat"


@pytest.mark.parametrize("host", ["ghcr.io", "Registry.Local:5000", "registry_1:5000", "[::1]:5000", "localhost"])
def test_registry_hosts_as_references_and_earlier_versions_write_them(tmp_path: Path, host: str) -> None:
    settings = load_settings(write(tmp_path, f"upstreams:\n  - {{host: '{host}', url: 'https://a.io'}}\n"))
    assert settings.upstreams[0].host == host.lower()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "upstreams:\n  - host: a.io\n    url: https://a.io\n  - host: b.io\n    url: nope\n",
            "upstreams[1].url: not a URL",
            id="bad_url",
        ),
        pytest.param("tag_tll: 1m\n", "tag_tll: unknown key", id="typo_key"),
        pytest.param("tag_ttl: soon\n", "tag_ttl: not a duration", id="bad_duration"),
        pytest.param("listen: localhost\n", "listen: not a listen address", id="bad_listen"),
        pytest.param("listen: 5000\n", 'listen: must be host:port, quoted, e.g. ":5000"', id="listen_a_port"),
        pytest.param(
            "listen: 'fd00::2:5000'\n", "an IPv6 address goes in brackets: [fd00::2]:5000", id="listen_ipv6_unbracketed"
        ),
        pytest.param("listen: '[fd00::zz]:5000'\n", "[fd00::zz] is no IPv6 address", id="listen_ipv6_not_an_address"),
        pytest.param(
            "listen: '[::1]:5002'\nmetrics_listen: '[0:0::1]:5002'\n",
            "is the address listen takes ('[::1]:5002')",
            id="metrics_on_the_same_address_written_otherwise",
        ),
        pytest.param(
            "auth:\n  policy:\n    - {effect: deny, repositories: [R1.Local/team/Secret]}\n",
            "auth.policy[0]: repositories: 'R1.Local/team/Secret' can never match: names are lower case,"
            " write 'r1.local/team/secret'",
            id="policy_glob_with_capitals",
        ),
        pytest.param(
            "listen: 0.0.0.0:5002\nmetrics_listen: 127.0.0.1:5002\n",
            "metrics_listen: '127.0.0.1:5002' is the address listen takes ('0.0.0.0:5002')",
            id="metrics_on_the_pull_port",
        ),
        pytest.param("upstreams: {a: 1}\n", "upstreams: must be a list", id="upstreams_not_a_list"),
        pytest.param("storage: /tmp/x\n", "storage: must be a section of keys", id="section_not_a_mapping"),
        pytest.param(
            "auth: {token_lifetime: 10s}\n", "auth.token_lifetime: must be at least 1m, not 10s", id="bound_seconds"
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', retries: {attempts: 0}}\n",
            "upstreams[0].retries.attempts: must be at least 1, not 0",
            id="bound_count",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', timeouts: {read: 0}}\n",
            "upstreams[0].timeouts.read: must be above 0s, not 0s",
            id="zero_timeout",
        ),
        pytest.param(
            # It was "must be at most 2.14748e+06 s, not 2.592e+06 s".
            "client_send_timeout: 30d\n",
            "client_send_timeout: must be at most 24d20h31m23s, not 30d",
            id="bound_seconds_in_days",
        ),
        pytest.param("upstreams: []\n", "upstreams: at least one upstream is needed", id="no_upstreams"),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', aliases: ['has space']}\n",
            "upstreams[0].aliases: not a registry host name: 'has space'",
            id="bad_alias",
        ),
        pytest.param(
            "upstreams:\n  - url: https://a.io\n", "upstreams[0].host: required key missing", id="missing_host"
        ),
        pytest.param(
            "upstreams:\n  - {host: '...', url: 'https://a.io'}\n",
            "upstreams[0].host: not a registry host name: '...'",
            id="dots_for_a_host",
        ),
        pytest.param(
            "upstreams:\n  - {host: 'q.io:', url: 'https://q.io'}\n",
            "upstreams[0].host: not a registry host name: 'q.io:'",
            id="host_with_an_empty_port",
        ),
        pytest.param(
            "upstreams:\n  - {host: 'q.io:" + "9" * 5000 + "', url: 'https://q.io'}\n",
            "upstreams[0].host: not a registry host name: 'q.io:99999",
            id="host_with_a_port_of_5000_digits",
        ),
        pytest.param(
            "upstreams:\n  - {host: 'q.io:70000', url: 'https://q.io'}\n",
            "upstreams[0].host: not a registry host name: 'q.io:70000'",
            id="host_with_a_port_out_of_range",
        ),
        pytest.param(
            "upstreams:\n  - {host: q.io, url: 'https://q .io'}\n",
            "upstreams[0].url: not a URL: 'https://q .io' (expected http://… or https://…)",
            id="url_with_a_space",
        ),
        pytest.param("storage:\n  size: 1\n", "storage.size: unknown key", id="nested_unknown"),
        pytest.param("a: " + "[" * 1000 + "]" * 1000 + "\n", "not valid YAML: nested too deep", id="too_deep"),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', default: true}\n"
            "  - {host: b.io, url: 'https://b.io', default: true}\n",
            "more than one default upstream",
            id="two_defaults",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', prefixes: [x]}\n"
            "  - {host: b.io, url: 'https://b.io', prefixes: [x]}\n",
            "'x' names both a.io and b.io",
            id="shared_prefix",
        ),
        # Each of these passed the check, then failed every pull or the start:
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io:abc'}\n",
            "upstreams[0].url: not a registry URL: 'https://a.io:abc' has no port from 1 to 65535",
            id="port_not_a_number",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'http://127.0.0.1:99999'}\n",
            "upstreams[0].url: not a registry URL: 'http://127.0.0.1:99999' has no port",
            id="port_out_of_range",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io/v2/'}\n",
            "upstreams[0].url: not a registry URL: 'https://a.io/v2/' ends in /v2",
            id="url_with_v2",
        ),
        pytest.param(
            "upstreams:\n  - {host: docker.io, url: 'https://a.io', default: true}\n"
            "  - {host: docker.io, url: 'https://b.io'}\n",
            "upstreams: more than one upstream has host docker.io",
            id="host_twice",
        ),
        pytest.param(
            "auth: {token_realm: 'cache.example:5000/token'}\n",
            "auth.token_realm: not a URL clients can sign in at",
            id="token_realm_without_scheme",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://robot:s3cret/RET@a.io'}\n",
            "upstreams[0].url: credentials do not go in the URL",
            id="password_with_a_slash",
        ),
        pytest.param("tls: {cert_file: '', key_file: k.pem}\n", "tls.cert_file: empty: name a file", id="empty_cert"),
        pytest.param(
            "auth: {token_realm: 'https://user:s3cret@cache.example/token'}\n",
            "auth.token_realm: not a URL clients can sign in at",
            id="token_realm_with_credentials",
        ),
        pytest.param(
            "auth: {token_realm: 'http://fd00::1:5000/token'}\n",
            "auth.token_realm: not a URL clients can sign in at",
            id="token_realm_ipv6_unbracketed",
        ),
        pytest.param(
            "auth: {token_realm: 'http://[::1/token'}\n",
            "auth.token_realm: not a URL clients can sign in at",
            id="token_realm_bracket_left_open",
        ),
        pytest.param(
            "upstreams:\n  - {host: '[:]', url: 'http://[::1]:5000'}\n",
            "no IPv6 address in its brackets",
            id="host_brackets_of_no_address",
        ),
        pytest.param("tag_ttl: .nan\n", "tag_ttl: not a duration", id="duration_nan"),
        pytest.param("shutdown_delay: .inf\n", "shutdown_delay: not a duration", id="duration_infinite"),
        pytest.param("tag_ttl: 99999999999999999999d\n", "tag_ttl: not a duration", id="duration_absurd"),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', prefixes: ['Bad/Prefix']}\n",
            "upstreams[0].prefixes: not a path prefix",
            id="bad_prefix",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', username: u, password_env: 'HUB-TOKEN'}\n",
            "upstreams[0].password_env: must be the name of an environment variable",
            id="bad_variable_name",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', password_env: HUB}\n",
            "upstreams[0]: a password is sent only with a username: set username too",
            id="password_without_username",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io', username: u,\n"
            "     password_env: HUB, password_file: /etc/hostname}\n",
            "upstreams[0]: set password_file or password_env, not both",
            id="two_passwords",
        ),
        pytest.param(
            "auth:\n  policy:\n    - {effect: allow, repositories: ['docker.io/*', 'library/*']}\n",
            "auth.policy[0].repositories: 'library/*' can never match",
            id="policy_glob_without_upstream",
        ),
        pytest.param(
            "auth:\n  policy:\n    - {effect: allow, repositories: ['index.docker.io/*']}\n",
            "'index.docker.io' names docker.io, and globs are over the upstream's host",
            id="policy_glob_by_alias",
        ),
        pytest.param(
            "auth: {anonymous: none}\n",
            "auth: anonymous: 'none' without an htpasswd_file refuses every pull",
            id="nobody_may_pull",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://bob:s3cret@a.io'}\n",
            "upstreams[0].url: credentials do not go in the URL: set username and password_file",
            id="credentials_in_url",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://bob:s3cret@a.io/v2?token=s3cret'}\n",
            "upstreams[0].url: credentials do not go in the URL",
            id="credentials_and_query_in_url",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'https://a.io/v2?token=s3cret#s3cret'}\n",
            "upstreams[0].url: not a registry URL: https://a.io/v2 has a query or fragment",
            id="token_in_query",
        ),
        pytest.param(
            "upstreams:\n  - {host: a.io, url: 'bob:s3cret@a.io'}\n",
            "upstreams[0].url: credentials do not go in the URL",
            id="credentials_without_scheme",
        ),
        pytest.param(
            "tag_ttl: 1m\nstorage: {path: /tmp/x}\ntag_ttl: 2m\n",
            "line 3: not valid YAML: 'tag_ttl' is given twice (first on line 1)",
            id="key_twice",
        ),
        pytest.param("storage: {path: /a, path: /b}\n", "'path' is given twice", id="key_twice_on_one_line"),
        pytest.param("listen: [1\n", "not valid YAML", id="bad_yaml"),
        pytest.param("- just\n- a list\n", "must hold a mapping", id="not_a_mapping"),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)
    assert "s3cret" not in str(caught.value), "a password in the file is never echoed"


def test_problems_in_several_sections_are_reported_at_once(tmp_path: Path) -> None:
    """One round of fixes, not one per problem; each line names its key once."""
    path = write(
        tmp_path,
        "storage: {low_watermark: 0.99, high_watermark: 0.95}\nlog_level: loud\n"
        "upstreams:\n  - {host: a.io, url: 'https://a.io', default: true}\n"
        "  - {host: b.io, url: 'https://b.io', default: true}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    lines = str(caught.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "storage: low_watermark (0.99) must be below high_watermark (0.95)",
        "log_level: Input should be 'debug', 'info', 'warning' or 'error'",
        "upstreams: more than one default upstream (a.io, b.io)",
    ]


def test_a_policy_rule_in_error_is_reported_once(tmp_path: Path) -> None:
    """Not also as an empty list of rules, which pydantic counts when its one rule failed."""
    policy = tmp_path / "policy.json"
    policy.write_text(
        '{"rules": [{"rulePriority": 1, "selection": {"tagStatus": "any", "countType": "imageCountMoreThan",'
        ' "countNumber": 0}, "action": {"type": "expire"}}]}'
    )
    path = write(tmp_path, f"upstreams:\n  - {{host: a.io, url: 'https://a.io', lifecycle_policy_file: {policy}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    said = f"{policy}: rules[0] (rulePriority 1).selection.countNumber: must be at least 1, not 0"
    assert str(caught.value).endswith(said)
    empty = tmp_path / "empty.json"
    empty.write_text('{"rules": []}')
    with pytest.raises(ConfigError, match="rules: must list at least 1 entry"):
        load_settings(
            write(tmp_path, f"upstreams:\n  - {{host: a.io, url: 'https://a.io', lifecycle_policy_file: {empty}}}\n")
        )


def test_unknown_environment_key_is_an_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"tag_tll: unknown key \(set by MOORAGE_TAG_TLL\)"):
        load_settings(None, {"MOORAGE_TAG_TLL": "1m"})


def test_a_section_check_blames_only_the_variable_whose_key_it_names(tmp_path: Path) -> None:
    """A wrong watermark pair in the file is no fault of MOORAGE_STORAGE__PATH, which set
    another key of the section; MOORAGE_STORAGE__LOW_WATERMARK is."""
    path = write(tmp_path, "storage: {high_watermark: 0.8, low_watermark: 0.9}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"MOORAGE_STORAGE__PATH": str(tmp_path / "store")})
    assert "low_watermark (0.9) must be below high_watermark (0.8)" in str(caught.value)
    assert "set by" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"\(set by MOORAGE_STORAGE__LOW_WATERMARK\)"):
        load_settings(write(tmp_path, "storage: {high_watermark: 0.8}\n"), {"MOORAGE_STORAGE__LOW_WATERMARK": "0.9"})


def test_equal_watermarks_are_refused(tmp_path: Path) -> None:
    """A pass would then free nothing below the mark that started it: the next blob stored
    starts another, and every pull pays for one."""
    with pytest.raises(ConfigError, match=r"low_watermark \(0.9\) must be below high_watermark \(0.9\)"):
        load_settings(write(tmp_path, "storage: {high_watermark: 0.9, low_watermark: 0.9}\n"))
    assert load_settings(write(tmp_path, "storage: {high_watermark: 0.9, low_watermark: 0.89}\n"))


@pytest.mark.parametrize("value", ["30d", "inf"])
def test_a_send_timeout_beyond_what_the_kernel_takes_is_refused_at_load(value: str) -> None:
    """TCP_USER_TIMEOUT holds at most 2**31 - 1 ms: beyond that ``serve`` died at start."""
    with pytest.raises(ConfigError, match="client_send_timeout"):
        load_settings(None, {"MOORAGE_CLIENT_SEND_TIMEOUT": value})
    assert load_settings(None, {"MOORAGE_CLIENT_SEND_TIMEOUT": "24d"}).client_send_timeout == 24 * 86400


def test_a_password_key_written_as_a_number_is_not_repeated(tmp_path: Path) -> None:
    """``password_env: 987654321012345`` is more likely the password than a variable's name."""
    upstream = "{host: a.io, url: 'https://a.io', username: u, password_env: 987654321012345}"
    path = write(tmp_path, f"upstreams:\n  - {upstream}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "upstreams[0].password_env" in str(caught.value) and "987654321012345" not in str(caught.value)


def test_anchors_and_merge_keys_load_as_yaml_says(tmp_path: Path) -> None:
    """The duplicate-key check passes over ``<<``: one upstream's settings reused by others."""
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "upstreams:\n"
        "  - &a {host: a.io, url: 'https://a.io', default: true, prefetch_blobs: 0, max_concurrent_fills: 4}\n"
        "  - {<<: *a, host: b.io, url: 'https://b.io', default: false}\n"
        "  - {<<: [*a], host: c.io, url: 'https://c.io', default: false, prefetch_blobs: 2}\n"
    )
    _, b, c = load_settings(path).upstreams
    assert (b.host, b.default, b.prefetch_blobs, b.max_concurrent_fills) == ("b.io", False, 0, 4)
    assert (c.host, c.prefetch_blobs, c.max_concurrent_fills) == ("c.io", 2, 4), "a key beside the merge wins"


def test_a_file_with_a_byte_that_is_not_utf8_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"# caf\xe9 du coin\ntag_ttl: 1m\n")
    with pytest.raises(ConfigError, match=r"latin.yaml:\n  cannot read the file: line 1 is not UTF-8 \(byte 0xe9\)"):
        load_settings(path)


def test_kubernetes_service_links_for_a_service_named_moorage_are_not_settings() -> None:
    # What Kubernetes puts in every pod of a namespace that has a Service named moorage (the
    # Helm chart's name for a release called moorage) and one named moorage-metrics.
    links = {
        "MOORAGE_SERVICE_HOST": "10.0.0.1",
        "MOORAGE_SERVICE_PORT": "5000",
        "MOORAGE_SERVICE_PORT_HTTP": "5000",
        "MOORAGE_PORT": "tcp://10.0.0.1:5000",
        "MOORAGE_PORT_5000_TCP": "tcp://10.0.0.1:5000",
        "MOORAGE_PORT_5000_TCP_PROTO": "tcp",
        "MOORAGE_PORT_5000_TCP_PORT": "5000",
        "MOORAGE_PORT_5000_TCP_ADDR": "10.0.0.1",
        "MOORAGE_METRICS_SERVICE_HOST": "10.0.0.2",
        "MOORAGE_METRICS_PORT_9090_TCP_ADDR": "10.0.0.2",
        "MOORAGE_V6_PORT": "tcp://[fd00::1]:5000",
    }
    assert load_settings(None, {**links, "MOORAGE_TAG_TTL": "1m"}).tag_ttl == 60
    assert settings_source(None, links) == "the defaults"
    # Keys still are keys: a mistyped one beside them is reported.
    with pytest.raises(ConfigError, match=r"tag_tll: unknown key \(set by MOORAGE_TAG_TLL\)"):
        load_settings(None, {**links, "MOORAGE_TAG_TLL": "1m"})
    with pytest.raises(ConfigError, match=r"upstreams\[0\].port: unknown key"):
        load_settings(None, {**links, "MOORAGE_UPSTREAMS__0__PORT": "1"})
    # A guess at a key's name is no service link: its value has another shape.
    with pytest.raises(ConfigError, match=r"port: unknown key \(set by MOORAGE_PORT\)"):
        load_settings(None, {"MOORAGE_PORT": "8080"})
    with pytest.raises(ConfigError, match=r"metrics_service_host: unknown key"):
        load_settings(None, {"MOORAGE_METRICS_SERVICE_HOST": "moorage.example"})


@pytest.mark.parametrize(
    ("text", "variable", "source", "problem"),
    [
        pytest.param(
            "storage: /data/moorage\n",
            "MOORAGE_STORAGE__MAX_SIZE",
            "{file}",
            "storage: must be a section of keys (MOORAGE_STORAGE__MAX_SIZE sets a key in it)",
            id="the_file_s_section_is_a_value",
        ),
        pytest.param(
            "",
            "MOORAGE_STORAGE__PATH__X",
            "the environment",
            "MOORAGE_STORAGE__PATH__X: storage.path is a value, not a section of keys",
            id="a_value_taken_for_a_section",
        ),
        pytest.param(
            "", "MOORAGE___X", "the environment", "MOORAGE___X: names no key", id="no_key_between_underscores"
        ),
        pytest.param(
            "",
            "MOORAGE_AUTH__POLICY__0__EFFECT",
            "the environment",
            "MOORAGE_AUTH__POLICY__0__EFFECT: there is no auth.policy list to set an entry of",
            id="an_entry_of_no_list",
        ),
    ],
)
def test_a_variable_that_cannot_set_its_key_is_blamed_or_blames_the_file(
    tmp_path: Path, text: str, variable: str, source: str, problem: str
) -> None:
    """The file's mistake was reported against the variable, and the variable's mistakes named
    neither it nor the key it meant."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {variable: "1"})
    assert caught.value.source == source.format(file=path)
    assert problem in str(caught.value)


def test_a_list_set_from_the_environment_says_lists_belong_in_the_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"MOORAGE_UPSTREAMS__0__ALIASES": "a,b"})
    assert "upstreams[0].aliases: must be a list" in str(caught.value)
    assert "set by MOORAGE_UPSTREAMS__0__ALIASES; a variable sets one value, lists belong in the file" in str(
        caught.value
    )


def test_an_empty_file_key_means_no_file(tmp_path: Path) -> None:
    """``password_file: ""`` (as a template renders an unset value) is no file, not the
    current directory, which serving would then fail to read."""
    path = write(
        tmp_path,
        "upstreams:\n  - {host: a.io, url: 'https://a.io', password_file: '', lifecycle_policy_file: ''}\n"
        "auth: {groups_file: '', token_signing_key_file: ' '}\n",
    )
    settings = load_settings(path)
    assert settings.upstreams[0].password_file is None and settings.upstreams[0].lifecycle_policy_file is None
    assert settings.auth.groups_file is None and settings.auth.token_signing_key_file is None


@pytest.mark.parametrize("cap", ["0", "''", "0GiB", "null"])
def test_a_size_cap_of_zero_or_empty_is_no_cap(tmp_path: Path, cap: str) -> None:
    """As 0 turns the intervals off: a cap of 0 bytes would evict every blob it stores."""
    assert load_settings(write(tmp_path, f"storage: {{max_size: {cap}}}\n")).storage.max_size is None
    unset = {"MOORAGE_STORAGE__MAX_SIZE": "" if cap == "''" else cap.replace("null", "0")}
    assert load_settings(write(tmp_path, "storage: {max_size: 5GiB}\n"), unset).storage.max_size is None
    assert load_settings(write(tmp_path, "storage: {max_size: 5GiB}\n")).storage.max_size == 5 * 2**30


TLS_FILES = {"MOORAGE_TLS__CERT_FILE": "c.pem", "MOORAGE_TLS__KEY_FILE": "k.pem"}


@pytest.mark.parametrize(
    ("text", "environ", "key"),
    [
        ("auth: {htpasswd_file: ''}\n", {"MOORAGE_AUTH__HTPASSWD_FILE": ""}, "auth.htpasswd_file"),
        (
            "tls: {cert_file: c.pem, key_file: k.pem, client_ca_file: ' '}\n",
            {**TLS_FILES, "MOORAGE_TLS__CLIENT_CA_FILE": ""},
            "tls.client_ca_file",
        ),
    ],
)
def test_an_empty_file_that_guards_access_is_refused(
    tmp_path: Path, text: str, environ: dict[str, str], key: str
) -> None:
    """Taken as unset, it would open the cache to anonymous pulls or drop client certificates:
    an unset template or environment variable must fail closed."""
    with pytest.raises(ConfigError, match=f"{key}: empty; leave the key out"):
        load_settings(write(tmp_path, text))
    with pytest.raises(ConfigError, match=f"{key}: empty"):
        load_settings(None, environ)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_settings(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15m", 900), ("1h30m", 5400), ("90", 90), ("500ms", 0.5), ("2d", 172800), (30, 30)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2592000, "30d"), (5400, "1h30m"), (90061.5, "1d1h1m1.5s"), (0.25, "250ms"), (0, "0s"), (60, "1m"), (3600, "1h")],
)
def test_durations_are_shown_as_the_settings_write_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
    assert parse_duration(text) == seconds


def test_durations_are_rounded_to_the_millisecond_once() -> None:
    """3599.9996 s came out as 59m60s."""
    assert [duration_text(s) for s in (3599.9996, 59.9999, 0.9996)] == ["1h", "1m", "1s"]


def test_a_bound_missed_by_less_than_a_millisecond_is_shown_in_seconds() -> None:
    """It read "must be at least 1m, not 1m"."""
    with pytest.raises(ConfigError, match=r"must be at least 60\.0 s, not 59\.9999 s"):
        load_settings(None, {"MOORAGE_AUTH__TOKEN_LIFETIME": "59.9999"})


@pytest.mark.parametrize("text", ["", "m15", "15 minutes", "-1", "1h-5m", "36501d", float("nan"), float("inf")])
def test_bad_durations(text: str | float) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("50GiB", 50 * 2**30), ("500MB", 500 * 10**6), ("1024", 1024), (7, 7), ("1.5Pi", 3 * 2**49), ("2PB", 2 * 10**15)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_check_config_command_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "upstreams:\n  - host: a.io\n    url: https://a.io\n  - host: b.io\n    url: nope\n")
    bad = subprocess.run(
        [sys.executable, "-m", "moorage.proxy", "check-config", str(path)], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2
    assert "upstreams[1].url: not a URL" in bad.stderr and str(path) in bad.stderr
    assert "Traceback" not in bad.stderr
    good = write(tmp_path, "tag_ttl: 5m\n")
    ok = subprocess.run(
        [sys.executable, "-m", "moorage.proxy", "check-config", str(good)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr


def test_serve_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "tag_tll: 1m\n")
    run = subprocess.run(
        [sys.executable, "-m", "moorage.proxy", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert run.returncode == 2
    assert "tag_tll: unknown key" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("auth", "refuses"),
    [
        ({}, False),
        ({"policy": [{"effect": "deny", "repositories": ["docker.io/evil/*"]}]}, True),  # no users needed
        ({"htpasswd_file": "{h}"}, True),  # anonymous none by default with users
        ({"htpasswd_file": "{h}", "anonymous": "pull", "policy": [{"effect": "allow", "users": ["ci"]}]}, False),
        ({"htpasswd_file": "{h}", "anonymous": "pull", "policy": [{"effect": "deny", "anonymous": True}]}, True),
    ],
)
def test_whether_the_settings_refuse_some_pulls(tmp_path: Path, auth: dict[str, object], refuses: bool) -> None:
    """What client-config's warning that refused clients go past the cache rests on."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    filled = {
        key: str(value).replace("{h}", str(htpasswd)) if key == "htpasswd_file" else value
        for key, value in auth.items()
    }
    path = write(tmp_path, yaml.safe_dump({"auth": filled}))
    assert load_settings(path).auth.refuses_some_pulls is refuses


@pytest.mark.parametrize(
    "glob", ["*", "docker.io", "docker.io/library/*", "*/library/*", "[dg]*/x", "ghcr.io/acme/*", "nvcr.io/*"]
)
def test_policy_globs_that_can_match_load(tmp_path: Path, glob: str) -> None:
    """Wildcards in the host part, a configured host, or a host configured elsewhere (warned
    of at start, not refused: a policy may be shared by caches with other upstreams)."""
    path = write(tmp_path, f"auth:\n  policy:\n    - {{effect: allow, repositories: ['{glob}']}}\n")
    assert load_settings(path).auth.policy[0].repositories == (glob,)


@pytest.mark.parametrize("cap", ["0.5", "0.0001KiB"])
def test_a_size_cap_below_a_byte_is_refused_not_taken_for_no_cap(tmp_path: Path, cap: str) -> None:
    with pytest.raises(ConfigError, match=r"storage\.max_size: .* is less than a byte; write 0"):
        load_settings(write(tmp_path, f"storage: {{max_size: '{cap}'}}\n"))


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1KiB", 1024),
        ("1MiB", 2**20),
        ("1Mi", 2**20),
        ("2GiB", 2 * 2**30),
        ("1TiB", 2**40),
        ("1kB", 1000),
        ("1GB", 10**9),
        ("1.5G", 1_500_000_000),
    ],
)
def test_every_size_unit_counts_as_written(text: str, size: int) -> None:
    """A cap in KiB or MiB read as thousands is a store 2.4 % or 4.9 % bigger than asked."""
    assert parse_size(text) == size


def test_a_path_from_home_is_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``storage.path: ~/moorage`` made a directory named ~ where the cache was started."""
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(write(tmp_path, "storage: {path: ~/moorage}\nauth: {groups_file: ~/groups}\n"))
    assert settings.storage.path == tmp_path / "moorage"
    assert settings.auth.groups_file == tmp_path / "groups"
