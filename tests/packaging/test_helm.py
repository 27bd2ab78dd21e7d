"""The Helm chart, rendered by Helm itself (the Helm SDK bundled by helm-python-sdk) for the
defaults and several value sets; every object validated against Kubernetes 1.30's schemas
(kubernetes-validate, strict); the config the pod gets accepted by Moorage; bad values
refused by the chart's schema with a message that names the key."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from moorage.config import (
    ConfigError,
    LifecyclePolicyError,
    LifecycleRule,
    Selection,
    load_lifecycle_policy,
    load_settings,
)

CHART = Path(__file__).resolve().parents[2] / "helm" / "moorage"
KUBERNETES = "1.30"
#: CRDs have no schema in kubernetes-validate; they are checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "exposed": {
        "service": {"type": "NodePort", "nodePort": 30500, "externalTrafficPolicy": "Local"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "host": "moorage.example.com",
            "tls": [{"secretName": "moorage-tls", "hosts": ["moorage.example.com"]}],
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "podDisruptionBudget": {"enabled": True},
        "networkPolicy": {"enabled": True, "allowFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
        "extraEnv": [
            {"name": "HTTPS_PROXY", "value": "http://proxy.example:3128"},
            {"name": "NO_PROXY", "value": ".svc,.cluster.local"},
            {
                "name": "MOORAGE_CLIENT_IDLE_TIMEOUT",
                "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "idle"}},
            },
        ],
    },
    "upstreams": {
        "config": {"tagTtl": "30m", "logLevel": "debug"},
        "upstreams": [
            {
                "host": "docker.io",
                "url": "https://registry-1.docker.io",
                "default": True,
                "aliases": ["index.docker.io"],
                "prefixes": ["docker-hub"],
                "username": "robot",
                "passwordSecret": "dockerhub-password",
            },
            {"host": "ghcr.io", "url": "https://ghcr.io", "prefixes": ["ghcr"], "tagTtl": "1h", "prefetchBlobs": 0},
            {"host": "registry.corp", "url": "https://registry.corp", "caConfigMap": "corp-registry-ca", "tagTtl": 0},
        ],
        "persistence": {"size": "200Gi", "storageClassName": "fast", "maxSize": "180GiB"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "image": {"repository": "registry.example.com/moorage", "tag": "0.1.0"},
    },
    "tls": {"tls": {"enabled": True, "secretName": "moorage-tls"}, "auth": {"htpasswdSecret": "moorage-users"}},
    "replicas": {
        "replicaCount": 3,
        "auth": {"htpasswdSecret": "moorage-users", "tokenSigningKeySecret": "moorage-token-key"},
        "ingress": {"enabled": True, "className": "nginx", "host": "moorage.example.com"},
        "podDisruptionBudget": {"enabled": True},
    },
    "policy": {
        "auth": {
            "htpasswdSecret": "moorage-users",
            "anonymous": "pull",
            "groups": {"ml": ["alice", "bob"], "ci": ["robot"]},
            "policy": [
                {
                    "effect": "allow",
                    "description": "CI pulls docker.io",
                    "groups": ["ci"],
                    "repositories": ["docker.io/*"],
                },
                {"effect": "allow", "groups": ["ml"], "repositories": ["nvcr.io/*"]},
                {
                    "effect": "allow",
                    "anonymous": True,
                    "cidrs": ["10.20.0.0/16"],
                    "repositories": ["docker.io/library/*"],
                },
                {"effect": "deny", "description": "nothing else"},
            ],
        },
        "upstreams": [
            {
                "host": "docker.io",
                "url": "https://registry-1.docker.io",
                "default": True,
                "lifecyclePolicy": {
                    "rules": [
                        {
                            "rulePriority": 1,
                            "description": "unpulled for 30 days",
                            "selection": {
                                "tagStatus": "any",
                                "countType": "sinceImagePulled",
                                "countUnit": "days",
                                "countNumber": 30,
                            },
                            "action": {"type": "expire"},
                        }
                    ]
                },
                "lifecyclePolicies": [
                    {
                        "repositories": "library/*",
                        "policy": {
                            "rules": [
                                {
                                    "rulePriority": 1,
                                    "selection": {
                                        "tagStatus": "tagged",
                                        "tagPatternList": ["v*"],
                                        "countType": "imageCountMoreThan",
                                        "countNumber": 5,
                                    },
                                    "action": {"type": "expire"},
                                }
                            ]
                        },
                    }
                ],
            },
            {"host": "nvcr.io", "url": "https://nvcr.io", "prefixes": ["ngc"]},
        ],
    },
}
SETTINGS_DIR = "/etc/moorage/settings"


def render_files(values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        files: dict[str, str] = chart.render(values, name="cache", namespace="registry")
    return files


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    files = render_files(values)
    objects = []
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_renders_objects_that_kubernetes_accepts(name: str) -> None:
    objects = render(VALUE_SETS[name])
    kinds = sorted(o["kind"] for o in objects)
    print(f"\n{name}: {len(objects)} objects: {', '.join(kinds)}")
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            endpoints = obj["spec"]["endpoints"]
            assert endpoints == [{"port": "http", "path": "/metrics", "interval": "30s"}]
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    expected = {"defaults": 3, "exposed": 7, "upstreams": 3, "tls": 3, "policy": 3, "replicas": 5}[name]
    assert len(objects) == expected


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_the_pod_gets_a_config_moorage_accepts(name: str, tmp_path: Path) -> None:
    objects = render(VALUE_SETS[name])
    config_map = by_kind(objects, "ConfigMap")
    # The files the pod finds beside its config (groups, lifecycle policies), where it finds them.
    files = {key: text for key, text in config_map["data"].items() if key != "config.yaml"}
    pod = by_kind(objects, "StatefulSet")["spec"]["template"]["spec"]
    mounted = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == SETTINGS_DIR]
    if files:
        (settings_volume,) = [v for v in pod["volumes"] if v["name"] == mounted[0]["name"]]
        assert sorted(item["key"] for item in settings_volume["configMap"]["items"]) == sorted(files)
    else:
        assert not mounted
    for key, text in files.items():
        (tmp_path / key).write_text(text)
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"].replace(SETTINGS_DIR, str(tmp_path)))
    settings = load_settings(path)
    assert str(settings.storage.path) == "/var/lib/moorage" and settings.listen == ":5000"
    # The secrets the pod mounts (certificate, htpasswd, credentials) exist only in a cluster.
    checked = subprocess.run(
        [sys.executable, "-m", "moorage.proxy", "check-config", "--skip-files", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    if name == "tls":
        assert settings.tls is not None and str(settings.tls.cert_file) == "/etc/moorage/tls/tls.crt"
        pod = by_kind(render(VALUE_SETS[name]), "StatefulSet")["spec"]["template"]["spec"]
        assert {"name": "tls", "secret": {"secretName": "moorage-tls"}} in pod["volumes"]
        assert pod["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        assert str(settings.auth.htpasswd_file) == "/etc/moorage/auth/htpasswd"
        assert not settings.auth.anonymous_may_pull
        htpasswd = {
            "name": "htpasswd",
            "secret": {"secretName": "moorage-users", "items": [{"key": "htpasswd", "path": "htpasswd"}]},
        }
        assert htpasswd in pod["volumes"]
    if name == "policy":
        assert settings.auth.groups_file == tmp_path / "groups"
        assert (tmp_path / "groups").read_text().splitlines() == ["ci: robot", "ml: alice bob"]
        assert [rule.effect for rule in settings.auth.policy] == ["allow", "allow", "allow", "deny"]
        assert settings.auth.policy[2].cidrs[0].compressed == "10.20.0.0/16"
        hub, ngc = settings.upstreams
        assert [binding.repositories for binding in hub.lifecycle] == ["library/*", "*"]
        assert ngc.lifecycle == ()
    if name == "upstreams":
        hub, ghcr, corp = settings.upstreams
        assert hub.default and hub.username == "robot"
        assert str(hub.password_file) == "/etc/moorage/credentials/0/password"
        assert str(corp.ca_file) == "/etc/moorage/ca/2/ca.crt" and hub.ca_file is None
        assert settings.tag_ttl_of(corp) == 0, "a tagTtl of 0 (always revalidate) is rendered, not dropped"
        pod = by_kind(objects, "StatefulSet")["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        (ca_volume,) = [v for v in pod["volumes"] if "configMap" in v and v["configMap"]["name"] == "corp-registry-ca"]
        assert mounts[ca_volume["name"]] == "/etc/moorage/ca/2"
        assert ca_volume["configMap"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
        assert settings.tag_ttl_of(ghcr) == 3600 and settings.tag_ttl == 1800
        assert hub.prefetch_blobs == 3 and ghcr.prefetch_blobs == 0  # 0 is rendered, not dropped
        assert settings.storage.max_size == 180 * 1024**3


def test_credentials_are_mounted_files_never_env_or_configmap() -> None:
    objects = render(VALUE_SETS["upstreams"])
    pod = by_kind(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "env" not in container and "envFrom" not in container
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert list(secrets.values()) == ["dockerhub-password"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[next(iter(secrets))] == "/etc/moorage/credentials/0"
    assert "password:" not in by_kind(objects, "ConfigMap")["data"]["config.yaml"]


def test_credentials_of_upstreams_with_like_names_are_volumes_of_their_own() -> None:
    """my.reg and my-reg once made one volume name twice, which Kubernetes refuses (a schema
    check does not see it); a port's ":" made a mount path some runtimes refuse."""
    upstreams: list[dict[str, Any]] = [
        {"host": "my.reg", "url": "https://my.reg", "default": True, "username": "a", "passwordSecret": "first"},
        {"host": "my-reg", "url": "https://my-reg", "username": "b", "passwordSecret": "second"},
        {"host": "reg.example:5443", "url": "https://reg.example:5443", "username": "c", "passwordSecret": "third"},
    ]
    objects = render({"upstreams": upstreams})
    pod = by_kind(objects, "StatefulSet")["spec"]["template"]["spec"]
    names = [volume["name"] for volume in pod["volumes"]]
    assert len(names) == len(set(names)), names
    secret_of = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mount_of = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    config = yaml.safe_load(by_kind(objects, "ConfigMap")["data"]["config.yaml"])
    for upstream, rendered in zip(upstreams, config["upstreams"], strict=True):
        (volume,) = [name for name, secret in secret_of.items() if secret == upstream["passwordSecret"]]
        assert rendered["password_file"] == f"{mount_of[volume]}/password" and ":" not in mount_of[volume]


def test_replicas_are_caches_of_their_own_and_a_client_stays_on_one() -> None:
    """Several replicas never share a store (SQLite on one volume); a node pulling an image
    through two of them would have each fetch its blobs, through the Service or the Ingress
    (ingress-nginx sends to the pods themselves, past the Service's affinity)."""
    objects = render(VALUE_SETS["replicas"])
    statefulset = by_kind(objects, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]  # one claim per pod: data-<name>-<ordinal>
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert by_kind(objects, "Service")["spec"]["sessionAffinity"] == "ClientIP"
    annotations = by_kind(objects, "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$remote_addr"
    one = render({"ingress": {"enabled": True, "host": "moorage.example.com"}})
    assert "sessionAffinity" not in by_kind(one, "Service")["spec"], "one replica: nothing to keep to"
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in by_kind(one, "Ingress")["metadata"]["annotations"]
    # Every replica signs and checks tokens with the one key the Secret holds.
    config = yaml.safe_load(by_kind(objects, "ConfigMap")["data"]["config.yaml"])
    assert config["auth"]["token_signing_key_file"] == "/etc/moorage/token-key/token-key.pem"
    pod = statefulset["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    (key_volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "moorage-token-key"]
    assert key_volume["secret"]["items"] == [{"key": "token-key.pem", "path": "token-key.pem"}]
    assert mounts[key_volume["name"]] == "/etc/moorage/token-key"
    # Without users there are no tokens to share, and no key is needed.
    assert by_kind(render({"replicaCount": 2}), "StatefulSet")["spec"]["replicas"] == 2


def test_replicas_with_users_and_no_shared_key_are_refused_with_the_key_to_set() -> None:
    """Each replica would make a key of its own: a token one issued is refused by the others."""
    with pytest.raises(helm.HelmRenderError) as caught:
        render({"replicaCount": 2, "auth": {"htpasswdSecret": "moorage-users"}})
    assert "auth.tokenSigningKeySecret: required with auth.htpasswdSecret and more than one replica" in str(
        caught.value
    )
    assert by_kind(render({"auth": {"htpasswdSecret": "moorage-users"}}), "StatefulSet")["spec"]["replicas"] == 1


def test_the_pod_runs_locked_down_with_probes() -> None:
    statefulset = by_kind(render({}), "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["enableServiceLinks"] is False  # no MOORAGE_PORT=tcp://… for a release named moorage
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # A slow start (a large index, a crashed run's downloads to sweep) is not killed by liveness.
    startup = container["startupProbe"]
    assert startup["httpGet"] == container["livenessProbe"]["httpGet"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 300
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /readyz writes on the volume, which network storage may take a second or more to do.
    assert container["readinessProbe"]["timeoutSeconds"] == container["livenessProbe"]["timeoutSeconds"] == 5
    # Re-owning every cached blob at each start would keep a large store's pod from starting.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert container["image"] == "moorage:0.1.0"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"replicaCount": "2"}, "/replicaCount", id="string_replicas"),
        pytest.param({"replicaCount": 17}, "/replicaCount", id="replicas_beyond_the_schema"),
        pytest.param(
            {"auth": {"tokenSigningKeySecret": "Token_Key"}}, "/auth/tokenSigningKeySecret", id="key_secret_name"
        ),
        pytest.param({"service": {"type": "Internal"}}, "/service/type", id="service_type"),
        pytest.param({"service": {"port": 70000}}, "/service/port", id="port_range"),
        pytest.param({"upstreams": [{"host": "quay.io"}]}, "url", id="upstream_without_url"),
        pytest.param({"upstreams": [{"host": "q.io", "url": "ftp://q.io"}]}, "/upstreams/0/url", id="upstream_url"),
        pytest.param({"upstreams": [{"host": "...", "url": "https://q.io"}]}, "/upstreams/0/host", id="dots_host"),
        pytest.param({"upstreams": [{"host": "q.io:", "url": "https://q.io"}]}, "/upstreams/0/host", id="empty_port"),
        pytest.param(
            {"upstreams": [{"host": "q.io:70000", "url": "https://q.io"}]}, "/upstreams/0/host", id="port_70000"
        ),
        pytest.param({"metrics": {"port": 80}}, "/metrics/port", id="metrics_port_below_1024"),
        pytest.param({"persistence": {"size": "1Gi", "maxSize": "45K"}}, "/persistence/maxSize", id="max_size_45k"),
        pytest.param({"upstreams": [{"host": "q.io", "url": "https://q .io"}]}, "/upstreams/0/url", id="url_space"),
        pytest.param({"config": {"tagTtl": "soon"}}, "/config/tagTtl", id="bad_duration"),
        pytest.param({"replicas": 2}, "replicas", id="unknown_key"),
        pytest.param({"ingress": {"enabled": True}}, "/ingress/host", id="ingress_without_host"),
        pytest.param({"tls": {"enabled": True}}, "/tls/secretName", id="tls_without_secret"),
        pytest.param({"auth": {"anonymous": "maybe"}}, "/auth/anonymous", id="anonymous_policy"),
        pytest.param({"auth": {"anonymous": "none"}}, "/auth/htpasswdSecret", id="nobody_may_pull"),
        pytest.param({"persistence": {"size": "1Gi", "maxSize": "lots"}}, "/persistence/maxSize", id="max_size"),
        pytest.param({"metrics": {"port": 5000}}, "/metrics/port", id="metrics_on_the_main_port"),
        pytest.param({"persistence": {"size": "1Gi", "maxSize": "45"}}, "/persistence/maxSize", id="max_size_45_bytes"),
        pytest.param({"persistence": {"size": "1Gi", "maxSize": 45}}, "/persistence/maxSize", id="max_size_45_number"),
        pytest.param({"auth": {"policy": [{"effect": "permit"}]}}, "/auth/policy/0/effect", id="policy_effect"),
        pytest.param({"auth": {"policy": [{"effect": "deny", "who": "me"}]}}, "who", id="policy_unknown_key"),
        pytest.param({"auth": {"groups": {"ml": "alice"}}}, "/auth/groups/ml", id="groups_not_a_list"),
        pytest.param(
            {"upstreams": [{"host": "q.io", "url": "https://q.io", "passwordSecret": "q"}]},
            "username",
            id="password_without_username",
        ),
        pytest.param(
            {"upstreams": [{"host": "q.io", "url": "https://q.io", "username": "", "passwordSecret": "q"}]},
            "/upstreams/0/username",
            id="password_with_an_empty_username",
        ),
        pytest.param({"extraEnv": [{"name": "N", "value": 1}]}, "/extraEnv/0/value", id="env_value_not_a_string"),
        pytest.param({"auth": {"tokenRealm": "moorage.example/token"}}, "/auth/tokenRealm", id="token_realm"),
        pytest.param({"extraEnv": [{"value": "x"}]}, "name", id="env_without_name"),
        pytest.param(
            {"service": {"externalTrafficPolicy": "Local"}},
            "/service/externalTrafficPolicy",
            id="traffic_policy_on_a_cluster_ip",
        ),
        pytest.param(
            {"service": {"type": "NodePort", "externalTrafficPolicy": "local"}},
            "/service/externalTrafficPolicy",
            id="traffic_policy_misspelt",
        ),
        # What the pod would refuse at start, with the one replica already replaced:
        pytest.param(
            {"auth": {"policy": [{"effect": "deny", "repositories": ["ghcr/*"]}]}},
            "/auth/policy/0/repositories/0",
            id="policy_glob_without_a_host",
        ),
        pytest.param(
            {"auth": {"policy": [{"effect": "deny", "cidrs": ["office"]}]}},
            "/auth/policy/0/cidrs/0",
            id="policy_cidr_not_an_address",
        ),
        pytest.param(
            {"upstreams": [{"host": "q.io", "url": "https://bob:pw@q.io"}]}, "/upstreams/0/url", id="url_credentials"
        ),
        pytest.param(
            {"upstreams": [{"host": "q.io", "url": "https://q.io", "aliases": ["q.io/mirror"]}]},
            "/upstreams/0/aliases/0",
            id="alias_with_a_path",
        ),
        pytest.param(
            {"upstreams": [{"host": "q.io", "url": "https://q.io", "lifecyclePolicy": {"rulez": []}}]},
            "rules",
            id="lifecycle_without_rules",
        ),
        pytest.param(
            {
                "upstreams": [
                    {
                        "host": "q.io",
                        "url": "https://q.io",
                        "lifecyclePolicies": [
                            {"repositories": "*", "policy": {"rules": [{"rulePriority": 1, "selection": {}}]}}
                        ],
                    }
                ]
            },
            "action",
            id="lifecycle_rule_without_action",
        ),
    ],
)
def test_bad_values_fail_the_schema(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)


def _rule(**selection: Any) -> dict[str, Any]:
    """A rule expiring what was not pulled for 30 days, its selection changed by ``selection``
    (a value of None drops the key)."""
    chosen = {"tagStatus": "any", "countType": "sinceImagePulled", "countUnit": "days", "countNumber": 30}
    chosen.update(selection)
    return {
        "rulePriority": 1,
        "selection": {key: value for key, value in chosen.items() if value is not None},
        "action": {"type": "expire"},
    }


BAD_RULES = {
    "unit_misspelt": _rule(countUnit="day"),
    "count_type_unknown": _rule(countType="sinceImageBuilt"),
    "count_not_positive": _rule(countNumber=0),
    "count_as_text": _rule(countNumber="30"),
    "key_misspelt": _rule(tagStatuz="any"),
    "tagged_without_a_list": _rule(tagStatus="tagged"),
    "tagged_with_both_lists": _rule(tagStatus="tagged", tagPrefixList=["v"], tagPatternList=["v*"]),
    "untagged_with_a_list": _rule(tagStatus="untagged", tagPrefixList=["v"]),
    "empty_prefix": _rule(tagStatus="tagged", tagPrefixList=[""]),
    "five_wildcards": _rule(tagStatus="tagged", tagPatternList=["*a*b*c*d*"]),
    "count_with_a_unit": _rule(countType="imageCountMoreThan"),
    "age_without_a_unit": _rule(countUnit=None),
    "action_unknown": {**_rule(), "action": {"type": "delete"}},
    "priority_zero": {**_rule(), "rulePriority": 0},
    "archive_selected": _rule(storageClass="archive"),
    "since_transitioned": _rule(countType="sinceImageTransitioned"),
    "transition": {**_rule(), "action": {"type": "transition", "targetStorageClass": "archive"}},
}
GOOD_RULES = {
    "any_not_pulled": _rule(),
    "tagged_by_prefix_kept_five": _rule(
        tagStatus="tagged", tagPrefixList=["v"], countType="imageCountMoreThan", countUnit=None, countNumber=5
    ),
    "tagged_by_pattern_pushed": _rule(tagStatus="tagged", tagPatternList=["*a*b*c*d"], countType="sinceImagePushed"),
    "untagged_described": {**_rule(tagStatus="untagged"), "description": "old builds"},
    "standard_storage_class": _rule(storageClass="standard"),  # ECR's template writes it
    "nulls_for_what_is_unsaid": {  # as YAML's ~ writes them; Moorage takes None for unset
        **_rule(tagStatus="untagged", countType="imageCountMoreThan", countUnit=None),
        "selection": {
            "tagStatus": "untagged",
            "tagPrefixList": None,
            "tagPatternList": None,
            "countType": "imageCountMoreThan",
            "countUnit": None,
            "countNumber": 3,
        },
    },
    "tagged_with_a_null_other_list": _rule(tagStatus="tagged", tagPrefixList=["v"])
    | {"selection": {**_rule(tagStatus="tagged", tagPrefixList=["v"])["selection"], "tagPatternList": None}},
}


@pytest.mark.parametrize("name", list(BAD_RULES) + list(GOOD_RULES))
def test_the_schema_refuses_the_lifecycle_rules_moorage_refuses(name: str, tmp_path: Path) -> None:
    """A policy change in the settings files restarts nothing: one the schema let through ran
    on, skipped at every pass, until the next restart refused it and left the cache down."""
    bad = name in BAD_RULES
    policy = {"rules": [(BAD_RULES if bad else GOOD_RULES)[name]]}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    upstream = {"host": "docker.io", "url": "https://registry-1.docker.io", "default": True}
    for values in (
        {"upstreams": [{**upstream, "lifecyclePolicy": policy}]},
        {"upstreams": [{**upstream, "lifecyclePolicies": [{"repositories": "library/*", "policy": policy}]}]},
    ):
        if bad:
            with pytest.raises(LifecyclePolicyError):
                load_lifecycle_policy(path)
            with pytest.raises(helm.HelmValuesError) as caught:
                render(values)
            assert "/upstreams/0/lifecyclePolic" in str(caught.value)
        else:
            assert load_lifecycle_policy(path).rules
            assert by_kind(render(values), "ConfigMap")


@pytest.mark.parametrize(
    ("host", "glob", "said"),
    [
        ("ghcr.io", "Team/*", "lower case"),
        ("ghcr.io", "ghcr.io/team/*", "upstream's host"),
        ("docker.io", "alpine", "library/<name>"),
        ("docker.io", "alp*", "library/<name>"),
        ("registry.k8s.io", "k8s.gcr.io/pause", "upstream's host"),  # by an alias
    ],
)
def test_lifecycle_globs_that_can_never_match_are_refused_by_the_chart_and_the_settings(
    host: str, glob: str, said: str, tmp_path: Path
) -> None:
    """A glob in the host form of the access policy, with a capital, or Docker Hub's short
    name: the policy never applied, and nothing said so (a preview's "0 images would expire"
    reads as success). Refused alike by the chart and at the pod's start."""
    policy = {"rules": [GOOD_RULES["any_not_pulled"]]}
    aliases = ["k8s.gcr.io"] if host == "registry.k8s.io" else []
    binding = {"repositories": glob, "policy": policy}
    upstream = {"host": host, "url": f"https://{host}", "aliases": aliases, "lifecyclePolicies": [binding]}
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as caught:
        render({"upstreams": [upstream]})
    assert said in str(caught.value) or "does not match" in str(caught.value)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    config = tmp_path / "config.yaml"
    bound = {"repositories": glob, "policy_file": str(path)}
    settings = {"host": host, "url": f"https://{host}", "aliases": aliases, "lifecycle_policies": [bound]}
    config.write_text(json.dumps({"upstreams": [settings]}))
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert said in str(refused.value) and "lifecycle_policies[0].repositories" in str(refused.value)
    fixed = {"Team/*": "team/*", "ghcr.io/team/*": "team/*", "alpine": "library/alpine", "alp*": "*/alp*"}.get(
        glob, "pause"
    )
    upstream["lifecyclePolicies"] = [{"repositories": fixed, "policy": policy}]
    assert by_kind(render({"upstreams": [upstream]}), "ConfigMap")


def test_the_schema_names_the_lifecycle_values_moorage_takes() -> None:
    """The schema's lists of names are the policy model's, so neither refuses what the other takes."""
    definitions = json.loads((CHART / "values.schema.json").read_text())["definitions"]
    selection = definitions["lifecycleSelection"]["properties"]
    for field in ("tagStatus", "countType", "countUnit"):
        annotation = Selection.model_fields[field].annotation
        unset: list[None] = []
        if typing.get_origin(annotation) is not typing.Literal:  # Literal[...] | None: null taken too
            (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
            unset = [None]
        assert selection[field]["enum"] == [*typing.get_args(annotation), *unset], field
    assert set(selection) == set(Selection.model_fields)
    rule = definitions["lifecycleRule"]["properties"]
    assert set(rule) == set(LifecycleRule.model_fields)
    assert rule["action"]["properties"]["type"]["enum"] == ["expire"]


@pytest.mark.parametrize(
    "host",
    [
        *("ghcr.io", "Registry.Local:5000", "[FE80::1]:5000", "q.io:05000", "q.io:0000000443", "registry_1:5000"),
        *("q.io:70000", "q.io:0", "q.io:000", "q.io:", "...", "ghcr.io.", "a b.io"),
    ],
)
def test_the_schema_takes_the_hosts_moorage_takes(host: str, tmp_path: Path) -> None:
    """What the schema refuses fails the install; what it takes and Moorage refuses fails the
    pod after an upgrade. The two agree on every host."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"upstreams": [{"host": host, "url": "https://q.io", "default": True}]}))
    try:
        load_settings(config)
    except ConfigError:
        moorage_takes = False
    else:
        moorage_takes = True
    try:
        render({"upstreams": [{"host": host, "url": "https://q.io", "default": True}]})
    except helm.HelmValuesError:
        schema_takes = False
    else:
        schema_takes = True
    assert schema_takes == moorage_takes, (host, schema_takes, moorage_takes)


def test_lint_finds_no_error() -> None:
    for values in VALUE_SETS.values():
        result = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}.0")
        assert result.get("errors") in (None, []), result


def notes(values: dict[str, Any]) -> str:
    files = render_files(values)
    (text,) = [text for path, text in files.items() if path.endswith("NOTES.txt")]
    return text


@pytest.mark.parametrize(
    ("values", "url", "hint"),
    [
        pytest.param({}, "http://MOORAGE_ADDRESS:5000", False, id="cluster_ip"),
        pytest.param(VALUE_SETS["exposed"], "http://MOORAGE_ADDRESS:30500", False, id="node_port"),
        pytest.param(
            {"service": {"type": "NodePort"}}, "http://MOORAGE_ADDRESS:NODE_PORT", True, id="node_port_chosen"
        ),
        pytest.param(VALUE_SETS["tls"], "https://MOORAGE_ADDRESS:5000", False, id="tls"),
    ],
)
def test_the_notes_tell_nodes_the_address_they_reach(values: dict[str, Any], url: str, hint: bool) -> None:
    """Nodes reach a NodePort on the node port, not the Service port, and a TLS listener over
    https: the snippets printed after install must say so."""
    text = notes(values)
    assert f'[host."{url}"]' in text and f'endpoint: ["{url}"]' in text and f"--url {url}" in text
    assert ("jsonpath='{.spec.ports[0].nodePort}'" in text) is hint
    # A node resolves names with its own resolver: the Service's DNS name sent pulls past the cache.
    cluster_ip = values.get("service", {}).get("type", "ClusterIP") == "ClusterIP"
    assert ("jsonpath='{.spec.clusterIP}'" in text) is cluster_ip
    tls = url.startswith("https")
    assert ('ca = "../moorage-ca.crt"' in text) is tls, "containerd must be told the CA, or it pulls past the cache"
    assert ("--ca ca.crt" in text) is tls
    assert ("ca_file: /etc/rancher/k3s/moorage-ca.crt" in text) is tls


def test_a_tls_listener_is_scraped_over_https() -> None:
    values = {
        "tls": {"enabled": True, "secretName": "moorage-tls"},
        "metrics": {"serviceMonitor": {"enabled": True, "tlsConfig": {"serverName": "moorage"}}},
    }
    (endpoint,) = by_kind(render(values), "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"serverName": "moorage"}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_every_reference_to_the_port_names_what_it_speaks(tls: bool) -> None:
    """Meshes and controllers read a port's protocol from its name (Istio: `http` is plain
    HTTP), so a TLS listener behind a port named `http` is spoken to in the wrong protocol;
    and a reference under an old name finds no port at all."""
    values: dict[str, Any] = {
        "service": {"type": "NodePort"},
        "ingress": {"enabled": True, "host": "moorage.example.com"},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True},
    }
    if tls:
        values["tls"] = {"enabled": True, "secretName": "moorage-tls"}
    name = "https" if tls else "http"
    objects = render(values)
    (port,) = by_kind(objects, "Service")["spec"]["ports"]
    assert (port["name"], port["targetPort"], port["appProtocol"]) == (name, name, name)
    (container,) = by_kind(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in container["ports"]] == [name]
    assert container["livenessProbe"]["httpGet"]["port"] == container["readinessProbe"]["httpGet"]["port"] == name
    backend = by_kind(objects, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"]["port"] == {"name": name}
    assert by_kind(objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == name
    assert by_kind(objects, "NetworkPolicy")["spec"]["ingress"][0]["ports"][0]["port"] == name


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_metrics_on_a_port_of_their_own_are_scraped_there_and_kept_off_node_ports(tls: bool, tmp_path: Path) -> None:
    """metrics_listen set through extraEnv (the README's way for keys the chart had no value
    for) moved /metrics off the main port, where the ServiceMonitor went on scraping a 404,
    and no Service or NetworkPolicy had its port."""
    values: dict[str, Any] = {
        "service": {"type": "NodePort"},
        "ingress": {"enabled": True, "host": "moorage.example.com"},
        "metrics": {"port": 9090, "serviceMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True},
    }
    if tls:
        values["tls"] = {"enabled": True, "secretName": "moorage-tls"}
    objects = render(values)
    for obj in objects:
        if obj["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    config = tmp_path / "config.yaml"
    config.write_text(by_kind(objects, "ConfigMap")["data"]["config.yaml"])
    assert load_settings(config).metrics_listen == ":9090"
    services = {service["metadata"]["name"]: service for service in objects if service["kind"] == "Service"}
    main, metrics = services["cache-moorage"], services["cache-moorage-metrics"]
    assert [port["name"] for port in main["spec"]["ports"]] == ["https" if tls else "http"], "no node port for it"
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [(port["name"], port["port"], port["targetPort"]) for port in metrics["spec"]["ports"]] == [
        ("metrics", 9090, "metrics")
    ]
    (container,) = by_kind(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    monitor = by_kind(objects, "ServiceMonitor")["spec"]
    assert monitor["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}], "plain HTTP"
    # It selects the metrics Service alone: the main one has no port of that name.
    selected = [
        name
        for name, service in services.items()
        if monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ]
    assert selected == ["cache-moorage-metrics"]
    assert [port["port"] for port in by_kind(objects, "NetworkPolicy")["spec"]["ingress"][0]["ports"]] == [
        "https" if tls else "http",
        "metrics",
    ]
    assert "cache-moorage-metrics" not in str(by_kind(objects, "Ingress"))


def test_a_node_port_may_keep_the_clients_address() -> None:
    """Access-policy rules with cidrs read the socket's address; through a NodePort with
    Kubernetes' default policy that is a node's."""
    values: dict[str, Any] = {"service": {"type": "NodePort", "externalTrafficPolicy": "Local"}}
    assert by_kind(render(values), "Service")["spec"]["externalTrafficPolicy"] == "Local"
    assert "externalTrafficPolicy" not in by_kind(render({}), "Service")["spec"]


def test_the_notes_warn_that_a_policy_binds_only_nodes_that_cannot_go_around() -> None:
    assert "--no-fallback" in notes(VALUE_SETS["policy"])
    assert "--no-fallback" not in notes({}), "no policy, nothing to go around"


def test_extra_environment_reaches_the_container_as_written() -> None:
    """A cluster behind an egress proxy needs HTTPS_PROXY; settings without a chart value
    need their MOORAGE_* variable."""
    (container,) = by_kind(render(VALUE_SETS["exposed"]), "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert container["env"] == VALUE_SETS["exposed"]["extraEnv"]


def test_an_ingress_in_front_of_a_tls_listener_speaks_https_to_it() -> None:
    """ingress-nginx speaks plain HTTP to the pod unless told: with tls.enabled every request
    through the Ingress would be a 502. An annotation given in the values replaces the chart's
    own, once (a duplicate key would leave the choice to the YAML reader)."""
    values: dict[str, Any] = {
        "tls": {"enabled": True, "secretName": "moorage-tls"},
        "ingress": {
            "enabled": True,
            "host": "moorage.example.com",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "1800"},
        },
    }
    (text,) = [t for p, t in render_files(values).items() if p.endswith("ingress.yaml")]
    annotations = yaml.safe_load(text)["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "1800"
    assert text.count("proxy-read-timeout") == 1
    values["tls"] = {"enabled": False}
    plain = by_kind(render(values), "Ingress")["metadata"]["annotations"]
    assert "nginx.ingress.kubernetes.io/backend-protocol" not in plain


def test_a_token_realm_behind_a_tls_ingress_is_set_or_the_notes_say_to(tmp_path: Path) -> None:
    """Behind an Ingress that terminates TLS the pod sees http, so the realm it builds would
    send clients' passwords to http://host/token."""
    values: dict[str, Any] = {
        "auth": {"htpasswdSecret": "moorage-users"},
        "ingress": {
            "enabled": True,
            "host": "moorage.example.com",
            "tls": [{"secretName": "moorage-tls", "hosts": ["moorage.example.com"]}],
        },
    }
    assert "set auth.tokenRealm=https://moorage.example.com/token" in notes(values)
    values["auth"]["tokenRealm"] = "https://moorage.example.com/token"
    assert "tokenRealm" not in notes(values)
    path = tmp_path / "config.yaml"
    path.write_text(by_kind(render(values), "ConfigMap")["data"]["config.yaml"])
    assert load_settings(path).auth.token_realm == "https://moorage.example.com/token"


def test_a_cap_in_petabytes_passes_the_schema_and_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    values = {"persistence": {"size": "2Pi", "maxSize": "1.5Pi"}}
    path.write_text(by_kind(render(values), "ConfigMap")["data"]["config.yaml"])
    assert load_settings(path).storage.max_size == 3 * 2**49


def test_the_notes_keep_the_fallback_caveats_of_the_manual() -> None:
    text = notes({})
    assert "leave the server line out" in text, "a _default copied with Docker Hub's server sends every fallback there"
    assert "v1.32.2 and v1.31.6" in text


@pytest.mark.parametrize(
    ("persistence", "cap"),
    [
        pytest.param({}, 43520 * 2**20, id="default_volume"),
        pytest.param({"size": "1.5Ti"}, 1336934 * 2**20, id="fractional_binary"),
        pytest.param({"size": "3000M"}, 2431 * 2**20, id="decimal"),
        pytest.param({"size": "200Gi", "maxSize": "150GiB"}, 150 * 2**30, id="set"),
        pytest.param({"size": "200Gi", "maxSize": "0"}, None, id="no_cap"),
        pytest.param({"size": "200Gi", "maxSize": 0}, None, id="no_cap_as_a_number"),  # --set persistence.maxSize=0
        pytest.param({"size": "200Gi", "maxSize": 50000000000.0}, 50000000000, id="bytes_as_a_float"),
    ],
)
def test_the_cache_is_capped_below_its_volume_unless_told_otherwise(
    tmp_path: Path, persistence: dict[str, str | int], cap: int | None
) -> None:
    """Uncapped, the cache would fill its volume, and a full disk cuts pulls in progress."""
    path = tmp_path / "config.yaml"
    path.write_text(by_kind(render({"persistence": persistence}), "ConfigMap")["data"]["config.yaml"])
    assert load_settings(path).storage.max_size == cap


@pytest.mark.parametrize(
    ("given", "seconds"),
    # 1000000.0: a values file's numbers are floats, which Helm writes as 1e+06 unless told.
    [(900, 900), (1000000.0, 1000000), (1.5, 1.5), ("1.5", 1.5), ("15m", 900)],
)
def test_a_duration_is_taken_as_a_number_of_seconds_too(tmp_path: Path, given: str | float, seconds: float) -> None:
    """``--set config.tagTtl=900`` arrives as a number: the manual's "a plain number of seconds"."""
    path = tmp_path / "config.yaml"
    path.write_text(by_kind(render({"config": {"tagTtl": given}}), "ConfigMap")["data"]["config.yaml"])
    assert load_settings(path).tag_ttl == seconds
