"""Routing of /v2/<name>: ns first, then a prefix, then the default upstream."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from moorage.config import DEFAULT_UPSTREAMS, UpstreamSettings
from moorage.upstreams import NoRoute, Route, Router
from moorage.upstreams._routing import MAX_REMEMBERED_ROUTES
from moorage.upstreams.reference import InvalidReference


@dataclass
class Upstream:
    settings: UpstreamSettings

    @property
    def host(self) -> str:
        return self.settings.host


@pytest.fixture
def router() -> Router[Upstream]:
    return Router(Upstream(s) for s in DEFAULT_UPSTREAMS)


@pytest.mark.parametrize(
    ("name", "ns", "host", "repository"),
    [
        pytest.param("alpine", None, "docker.io", "library/alpine", id="official_image"),
        pytest.param("library/alpine", None, "docker.io", "library/alpine", id="library_explicit"),
        pytest.param("bitnami/redis", None, "docker.io", "bitnami/redis", id="user_image"),
        pytest.param("library/alpine", "docker.io", "docker.io", "library/alpine", id="ns_docker"),
        pytest.param("alpine", "index.docker.io", "docker.io", "library/alpine", id="ns_alias"),
        pytest.param("owner/app", "ghcr.io", "ghcr.io", "owner/app", id="ns_ghcr"),
        pytest.param("ghcr.io/owner/app", None, "ghcr.io", "owner/app", id="host_prefix"),
        pytest.param("ghcr/owner/app", None, "ghcr.io", "owner/app", id="named_prefix"),
        pytest.param("docker-hub/library/nginx", None, "docker.io", "library/nginx", id="docker_hub_prefix"),
        pytest.param("docker-hub/nginx", None, "docker.io", "library/nginx", id="docker_hub_prefix_short"),
        pytest.param("registry.k8s.io/pause", None, "registry.k8s.io", "pause", id="k8s_no_library"),
        pytest.param("ghcr", None, "docker.io", "library/ghcr", id="prefix_alone_is_a_name"),
        pytest.param("ghcr.io/owner/app", "docker.io", "docker.io", "ghcr.io/owner/app", id="ns_beats_prefix"),
        # containerd's override_path with a mirror URL of /v2/<host>: the host and the ns.
        pytest.param("ghcr.io/owner/app", "ghcr.io", "ghcr.io", "owner/app", id="ns_with_its_own_host"),
        pytest.param("docker.io/library/nginx", "docker.io", "docker.io", "library/nginx", id="ns_with_host_hub"),
        pytest.param("index.docker.io/nginx", "docker.io", "docker.io", "library/nginx", id="ns_with_alias"),
        # A short prefix is a repository's first component under ns: it may be one.
        pytest.param("mcr/hello-world", "mcr.microsoft.com", "mcr.microsoft.com", "mcr/hello-world", id="ns_keeps_mcr"),
        pytest.param("ghcr/owner/app", "ghcr.io", "ghcr.io", "ghcr/owner/app", id="ns_keeps_prefix"),
    ],
)
def test_routes(router: Router[Upstream], name: str, ns: str | None, host: str, repository: str) -> None:
    route = router.resolve(name, ns)
    assert route.upstream.host == host
    assert route.repository == repository


def test_unknown_ns_names_the_configured_hosts(router: Router[Upstream]) -> None:
    with pytest.raises(NoRoute) as caught:
        router.resolve("library/alpine", "registry.example.com")
    assert "registry.example.com" in str(caught.value)
    assert "ghcr.io" in str(caught.value) and "docker.io" in str(caught.value)


def test_no_default_upstream_asks_for_a_prefix() -> None:
    router = Router([Upstream(UpstreamSettings(host="ghcr.io", url="https://ghcr.io", prefixes=("ghcr",)))])
    with pytest.raises(NoRoute, match="ghcr"):
        router.resolve("owner/app")
    assert router.resolve("ghcr/owner/app").repository == "owner/app"


@pytest.mark.parametrize("name", ["Upper/case", "a/../b", "ghcr.io/", "x" * 256])
def test_names_are_parsed_before_routing(router: Router[Upstream], name: str) -> None:
    with pytest.raises(InvalidReference):
        router.resolve(name)


def test_remembered_names_answer_as_before_and_failures_are_not_kept(
    router: Router[Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    worked_out: list[tuple[str, str | None]] = []
    resolve = router._resolve

    def counted(name: str, ns: str | None) -> Route[Upstream]:
        worked_out.append((name, ns))
        return resolve(name, ns)

    monkeypatch.setattr(router, "_resolve", counted)
    first = router.resolve("alpine")
    assert router.resolve("alpine") is first and worked_out == [("alpine", None)], "the second is remembered"
    assert router.resolve("alpine", " GHCR.io ") is router.resolve("alpine", "ghcr.io"), "ns as routing reads it"
    for _ in range(2):
        with pytest.raises(InvalidReference):
            router.resolve("Upper/case")
        with pytest.raises(NoRoute):
            router.resolve("owner/app", "nowhere.example")
    assert worked_out.count(("Upper/case", None)) == 2 and worked_out.count(("owner/app", "nowhere.example")) == 2
    for i in range(MAX_REMEMBERED_ROUTES + 10):  # past the bound: the map starts again
        assert router.resolve(f"team/app-{i}", "ghcr.io").repository == f"team/app-{i}"
    assert router.resolve("alpine") == first
