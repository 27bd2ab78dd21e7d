"""ECR lifecycle policies: the checks ECR makes on a policy, and its evaluation semantics, on
the worked examples of ECR's documentation (same images, same rules, same outcome)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moorage.cache import CachedImage, evaluate
from moorage.config import ConfigError, LifecyclePolicy, LifecyclePolicyError, load_lifecycle_policy, load_settings
from moorage.upstreams.reference import Digest

NOW = 1_800_000_000.0
DAY = 86400.0


def image(name: str, tags: list[str], days_ago: float, pulled_days_ago: float | None = None) -> CachedImage:
    return CachedImage(
        "docker.io",
        "team/app",
        Digest.of(name.encode()),
        frozenset(tags),
        NOW - days_ago * DAY,
        None if pulled_days_ago is None else NOW - pulled_days_ago * DAY,
    )


def rule(priority: int, status: str, count_type: str, number: int, **lists: list[str]) -> dict[str, Any]:
    selection: dict[str, Any] = {"tagStatus": status, "countType": count_type, "countNumber": number, **lists}
    if count_type != "imageCountMoreThan":
        selection["countUnit"] = "days"
    return {
        "rulePriority": priority,
        "description": f"Rule {priority}",
        "selection": selection,
        "action": {"type": "expire"},
    }


def expired(rules: list[dict[str, Any]], images: dict[str, CachedImage]) -> dict[str, int]:
    """Which of ``images`` the policy expires, and by which rule."""
    names = {img.digest: name for name, img in images.items()}
    policy = LifecyclePolicy.model_validate({"rules": rules})
    return {names[e.image.digest]: e.rule.rulePriority for e in evaluate(policy, images.values(), NOW)}


# -- ECR's examples ("Examples of lifecycle policies in Amazon ECR") ----------------------------


def test_multiple_rules_example_a_an_image_seen_by_a_higher_rule_is_kept() -> None:
    images = {
        "A": image("A", ["beta-1", "prod-1"], 10),
        "B": image("B", ["beta-2", "prod-2"], 9),
        "C": image("C", ["beta-3"], 8),
    }
    rules = [
        rule(1, "tagged", "imageCountMoreThan", 1, tagPatternList=["prod*"]),
        rule(2, "tagged", "imageCountMoreThan", 1, tagPatternList=["beta*"]),
    ]
    assert expired(rules, images) == {"A": 1}


def test_multiple_rules_example_b_the_same_images_with_priorities_swapped() -> None:
    images = {
        "A": image("A", ["beta-1", "prod-1"], 10),
        "B": image("B", ["beta-2", "prod-2"], 9),
        "C": image("C", ["beta-3"], 8),
    }
    rules = [
        rule(1, "tagged", "imageCountMoreThan", 1, tagPatternList=["beta*"]),
        rule(2, "tagged", "imageCountMoreThan", 1, tagPatternList=["prod*"]),
    ]
    assert expired(rules, images) == {"A": 1, "B": 1}


def test_multiple_tags_example_a_every_pattern_must_match_a_tag() -> None:
    images = {
        "A": image("A", ["alpha-1"], 12),
        "B": image("B", ["beta-1"], 11),
        "C": image("C", ["alpha-2", "beta-2"], 10),
        "D": image("D", ["alpha-3"], 4),
        "E": image("E", ["beta-3"], 3),
        "F": image("F", ["alpha-4", "beta-4"], 2),
    }
    rules = [rule(1, "tagged", "sinceImagePushed", 5, tagPatternList=["alpha*", "beta*"])]
    assert expired(rules, images) == {"C": 1}


def test_multiple_tags_example_b_tags_are_not_exclusive() -> None:
    images = {
        "A": image("A", ["alpha-1", "beta-1", "gamma-1"], 10),
        "B": image("B", ["alpha-2", "beta-2"], 9),
        "C": image("C", ["alpha-3", "beta-3", "gamma-2"], 8),
    }
    rules = [rule(1, "tagged", "imageCountMoreThan", 1, tagPatternList=["alpha*", "beta*"])]
    assert expired(rules, images) == {"A": 1, "B": 1}


def test_multiple_tags_with_a_prefix_list_select_the_same_images() -> None:
    images = {
        "A": image("A", ["alpha-1"], 12),
        "C": image("C", ["alpha-2", "beta-2"], 10),
        "F": image("F", ["alpha-4", "beta-4"], 2),
    }
    rules = [rule(1, "tagged", "sinceImagePushed", 5, tagPrefixList=["alpha", "beta"])]
    assert expired(rules, images) == {"C": 1}


def test_all_images_example_a_keep_only_the_newest() -> None:
    images = {
        "A": image("A", ["alpha-1"], 4),
        "B": image("B", ["beta-1"], 3),
        "C": image("C", [], 2),
        "D": image("D", ["alpha-2"], 1),
    }
    assert expired([rule(1, "any", "imageCountMoreThan", 1)], images) == {"A": 1, "B": 1, "C": 1}


def test_all_images_example_b_every_rule_type_in_one_policy() -> None:
    images = {
        "A": image("A", ["alpha-1", "beta-1"], 4),
        "B": image("B", [], 3),
        "C": image("C", ["alpha-2"], 2),
        "D": image("D", ["git hash"], 1.04),  # "1 day ago", pushed before E
        "E": image("E", [], 0.99),  # "1 day ago": not older than one day
    }
    rules = [
        rule(1, "tagged", "imageCountMoreThan", 1, tagPatternList=["alpha*"]),
        rule(2, "untagged", "sinceImagePushed", 1),
        rule(3, "any", "imageCountMoreThan", 1),
    ]
    assert expired(rules, images) == {"A": 1, "B": 2, "D": 3}


def test_filtering_on_image_age() -> None:
    images = {
        "old-prod": image("old-prod", ["prod-1"], 20),
        "young-prod": image("young-prod", ["production"], 3),
        "old-dev": image("old-dev", ["dev-1"], 30),
    }
    rules = [rule(1, "tagged", "sinceImagePushed", 14, tagPatternList=["prod*"])]
    assert expired(rules, images) == {"old-prod": 1}


def test_keep_only_one_untagged_image() -> None:
    images = {
        "u1": image("u1", [], 3),
        "u2": image("u2", [], 2),
        "u3": image("u3", [], 1),
        "tagged": image("tagged", ["v1"], 9),
    }
    assert expired([rule(1, "untagged", "imageCountMoreThan", 1)], images) == {"u1": 1, "u2": 1}


def test_keep_the_last_n_tagged_v_releases() -> None:
    images = {f"v{n}": image(f"v{n}", [f"v1.{n}"], 10 - n) for n in range(6)}
    images["latest"] = image("latest", ["latest"], 20)
    rules = [rule(1, "tagged", "imageCountMoreThan", 3, tagPatternList=["v*"])]
    assert expired(rules, images) == {"v0": 1, "v1": 1, "v2": 1}


def test_since_image_pulled_uses_the_last_pull_and_falls_back_to_first_cached() -> None:
    images = {
        "pulled-lately": image("pulled-lately", ["a"], 100, pulled_days_ago=2),
        "pulled-long-ago": image("pulled-long-ago", ["b"], 100, pulled_days_ago=40),
        "never-pulled-old": image("never-pulled-old", ["c"], 45),
        "never-pulled-new": image("never-pulled-new", ["d"], 5),
    }
    rules = [rule(1, "any", "sinceImagePulled", 30)]
    assert expired(rules, images) == {"pulled-long-ago": 1, "never-pulled-old": 1}


def test_a_pattern_without_wildcard_matches_the_whole_tag_only() -> None:
    images = {"exact": image("exact", ["prod"], 9), "longer": image("longer", ["prod-1"], 8)}
    rules = [rule(1, "tagged", "sinceImagePushed", 1, tagPatternList=["prod"])]
    assert expired(rules, images) == {"exact": 1}


# -- ECR's checks on a policy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "problem"),
    [
        ([rule(1, "tagged", "imageCountMoreThan", 1)], "tagStatus tagged needs exactly one"),
        (
            [rule(1, "tagged", "imageCountMoreThan", 1, tagPrefixList=["a"], tagPatternList=["b*"])],
            "tagStatus tagged needs exactly one",
        ),
        ([rule(1, "untagged", "imageCountMoreThan", 1, tagPrefixList=["a"])], "takes no tagPrefixList"),
        ([rule(1, "any", "imageCountMoreThan", 1, tagPatternList=["a*"])], "takes no tagPatternList"),
        (
            [rule(1, "any", "imageCountMoreThan", 1), rule(2, "tagged", "imageCountMoreThan", 1, tagPrefixList=["a"])],
            "must have the highest rulePriority",
        ),
        (
            [
                rule(1, "tagged", "imageCountMoreThan", 1, tagPrefixList=["a"]),
                rule(1, "untagged", "sinceImagePushed", 1),
            ],
            "rulePriority must be unique",
        ),
        (
            [rule(1, "untagged", "imageCountMoreThan", 1), rule(2, "untagged", "sinceImagePushed", 1)],
            "only one rule may select untagged images",
        ),
        ([rule(1, "tagged", "imageCountMoreThan", 1, tagPatternList=["a*b*c*d*e*f"])], "more than 4 wildcards"),
        (
            [
                rule(1, "tagged", "imageCountMoreThan", 1, tagPrefixList=["v"]),
                rule(2, "tagged", "imageCountMoreThan", 2, tagPrefixList=["v"]),
            ],
            "tag prefix 'v' appears in rules 1 and 2",
        ),
        ([rule(1, "untagged", "imageCountMoreThan", 0)], "countNumber"),
        ([{**rule(1, "untagged", "imageCountMoreThan", 1), "action": {"type": "delete"}}], "action.type"),
        ([], "rules"),
    ],
)
def test_ecr_refuses_these_policies_and_so_do_we(rules: list[dict[str, Any]], problem: str, tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rules": rules}))
    with pytest.raises(LifecyclePolicyError) as caught:
        load_lifecycle_policy(path)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"selection": {"storageClass": "archive"}}, "archive: the cache has no archive tier"),
        ({"selection": {"countType": "sinceImageTransitioned"}}, "sinceImageTransitioned: the cache has no archive"),
        ({"action": {"type": "transition", "targetStorageClass": "archive"}}, "transition: the cache has no archive"),
    ],
)
def test_rules_of_the_archive_tier_are_refused_saying_why(
    change: dict[str, dict[str, str]], problem: str, tmp_path: Path
) -> None:
    """ECR's current template writes storageClass: standard, taken as it is (every cached
    image is standard); it had been refused as an unknown key, with every policy copied
    from an ECR console. What needs an archive tier is refused, saying that is why."""
    path = tmp_path / "policy.json"
    standard = rule(1, "any", "sinceImagePulled", 30)
    standard["selection"]["storageClass"] = "standard"
    path.write_text(json.dumps({"rules": [standard]}))
    assert load_lifecycle_policy(path).rules[0].selection.storageClass == "standard"
    archived = rule(1, "any", "sinceImagePulled", 30)
    for part, values in change.items():
        archived[part] = {**archived[part], **values}
    path.write_text(json.dumps({"rules": [archived]}))
    with pytest.raises(LifecyclePolicyError, match=problem):
        load_lifecycle_policy(path)


def test_an_error_names_the_rule_by_its_priority_too(tmp_path: Path) -> None:
    """Preview and the logs name rules by priority; with priorities 10 and 20, rules[1] read
    as rule 1."""
    path = tmp_path / "policy.json"
    rules = [
        rule(10, "tagged", "imageCountMoreThan", 1, tagPrefixList=["v"]),
        rule(20, "tagged", "sinceImagePushed", 1),
    ]
    path.write_text(json.dumps({"rules": rules}))
    with pytest.raises(LifecyclePolicyError, match=r"rules\[1\] \(rulePriority 20\)\.selection: tagStatus tagged"):
        load_lifecycle_policy(path)


def test_count_unit_goes_with_the_since_types_only(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    with_unit = rule(1, "untagged", "sinceImagePushed", 1)
    with_unit["selection"]["countType"] = "imageCountMoreThan"
    path.write_text(json.dumps({"rules": [with_unit]}))
    with pytest.raises(LifecyclePolicyError, match="countUnit goes only with"):
        load_lifecycle_policy(path)
    without_unit = rule(1, "untagged", "sinceImagePushed", 1)
    del without_unit["selection"]["countUnit"]
    path.write_text(json.dumps({"rules": [without_unit]}))
    with pytest.raises(LifecyclePolicyError, match="needs countUnit"):
        load_lifecycle_policy(path)


def test_a_bad_policy_file_is_a_config_error_naming_the_key_and_the_file(tmp_path: Path) -> None:
    policy = tmp_path / "lifecycle.json"
    policy.write_text(json.dumps({"rules": [rule(1, "tagged", "imageCountMoreThan", 1)]}))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"upstreams:\n  - host: docker.io\n    url: https://registry-1.docker.io\n    lifecycle_policy_file: {policy}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert str(config) in message
    assert f"upstreams[0].lifecycle_policy_file: {policy}: rules[0] (rulePriority 1).selection: " in message
    assert "tagStatus tagged needs exactly one" in message


def test_a_policy_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    policy = tmp_path / "lifecycle.json"
    policy.write_text("{rules: [")
    with pytest.raises(LifecyclePolicyError, match=f"{policy}: not valid JSON"):
        load_lifecycle_policy(policy)


def test_the_documentation_example_policies_load(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {
                "rules": [
                    rule(1, "tagged", "imageCountMoreThan", 1, tagPatternList=["alpha*"]),
                    rule(2, "untagged", "sinceImagePushed", 1),
                    rule(3, "any", "imageCountMoreThan", 1),
                ]
            }
        )
    )
    policy = load_lifecycle_policy(path)
    assert [r.rulePriority for r in policy.ordered] == [1, 2, 3]


def test_a_tag_cached_both_as_an_index_and_as_its_platform_manifest_is_one_image() -> None:
    from dataclasses import replace

    from moorage.cache._lifecycle import _fold_platforms

    platform = image("platform", ["v1"], 5)
    untagged_platform = image("untagged-platform", [], 5)
    own_release = image("own-release", ["arm-only"], 5)
    index = replace(image("index", ["v1"], 5), children=(platform.digest, untagged_platform.digest, own_release.digest))
    folded = _fold_platforms([index, platform, untagged_platform, own_release])
    assert [img.digest for img in folded] == [index.digest, own_release.digest]
    assert set(folded[0].children) == {platform.digest, untagged_platform.digest}, (
        "expiring the index takes the platforms it absorbed, not an image tagged on its own"
    )


def test_an_index_within_an_index_and_an_image_s_referrers_go_with_the_image() -> None:
    """Folded one level only, an inner index's platform manifests stayed behind for good when
    the image expired (gc keeps what an image record names); and an untagged signature or SBOM
    was judged alone, so a rule for untagged images took it from the image it signs."""
    from dataclasses import replace

    from moorage.cache._lifecycle import _fold_platforms

    leaf = image("leaf", [], 5)
    inner = replace(image("inner", [], 5), children=(leaf.digest,))
    top = replace(image("top", ["v1"], 5), children=(inner.digest,))
    signature = replace(image("signature", [], 4), subject=top.digest)
    sbom_of_leaf = replace(image("sbom", [], 4), subject=leaf.digest)
    tagged_signature = replace(image("cosign", ["sha256-top.sig"], 4), subject=top.digest)
    folded = _fold_platforms([top, inner, leaf, signature, sbom_of_leaf, tagged_signature])
    assert [img.digest for img in folded] == [top.digest, tagged_signature.digest], "a tag of its own is judged alone"
    assert set(folded[0].children) == {inner.digest, leaf.digest, signature.digest, sbom_of_leaf.digest}
    untagged = [rule(1, "untagged", "sinceImagePushed", 1)]  # every untagged image is older than a day
    policy = LifecyclePolicy.model_validate({"rules": untagged})
    assert evaluate(policy, folded, NOW) == [], "no untagged image left to judge"


def test_platform_manifests_an_image_that_stays_carries_too_stay_with_it() -> None:
    """v2's index reuses v1's arm64 manifest: expiring v1 dropped that manifest's records, and
    v2 lost it as a child (a pull of it by digest no longer kept v2)."""
    shared, own = image("shared-arm64", [], 10), image("own-amd64", [], 10)
    from dataclasses import replace

    v1 = replace(image("v1", ["v1"], 10), children=(shared.digest, own.digest))
    v2 = replace(image("v2", ["v2"], 1), children=(shared.digest,))
    policy = LifecyclePolicy.model_validate(
        {"rules": [rule(1, "tagged", "imageCountMoreThan", 1, tagPrefixList=["v"])]}
    )
    (expiry,) = evaluate(policy, [v1, v2], NOW)
    assert expiry.image.digest == v1.digest and expiry.shared == frozenset({shared.digest})


def test_parts_that_name_each_other_are_one_image_not_lost() -> None:
    """A manifest that lists another and names it as its subject too (odd content, or
    hostile): each absorbed the other, no image carried them, and lifecycle never saw them;
    nor may what hangs below them be judged alone (a platform manifest of an image in use)."""
    from dataclasses import replace

    from moorage.cache._lifecycle import _fold_platforms

    x, y, z = image("x", [], 5, pulled_days_ago=1), image("y", [], 5), image("z", [], 5)
    x = replace(x, children=(y.digest, z.digest), subject=y.digest)
    (folded,) = _fold_platforms([x, y, z])
    assert {folded.digest, *folded.children} == {x.digest, y.digest, z.digest}
    not_pulled = LifecyclePolicy.model_validate({"rules": [rule(1, "untagged", "sinceImagePulled", 7)]})
    assert evaluate(not_pulled, [folded], NOW) == [], "pulled yesterday: none of its parts goes"
    pushed = LifecyclePolicy.model_validate({"rules": [rule(1, "untagged", "sinceImagePushed", 1)]})
    assert [e.image.digest for e in evaluate(pushed, [folded], NOW)] == [folded.digest]
