"""ECR lifecycle policies: the same JSON documents, read and checked by ECR's rules.

A policy is ``{"rules": [...]}``; each rule has ``rulePriority`` (unique), an optional
``description``, a ``selection`` (``tagStatus``, ``tagPrefixList`` or ``tagPatternList``,
``countType``, ``countUnit``, ``countNumber``) and ``action: {"type": "expire"}``. The checks
are ECR's: a ``tagged`` rule needs exactly one of the two lists, ``untagged`` and ``any`` take
neither, a ``tagStatus: any`` rule has the highest priority, only one rule selects untagged
images, a pattern has at most four ``*``, ``countUnit`` (``days``) goes with the ``since*``
types only, ``countNumber`` is at least 1.

One difference, because a cache has no archive tier: ``sinceImagePulled`` may ``expire``
(in ECR it may only ``transition``). ECR's ``storageClass: standard`` (every cached image is
standard) is taken and changes nothing; ``archive``, ``sinceImageTransitioned`` and the
``transition`` action are refused, saying why. Evaluation lives in ``moorage.cache``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError, model_validator

from ._describe import describe_error, without_echoes
from ._files import UnreadableFile, read_text

__all__ = ["LifecyclePolicy", "LifecyclePolicyError", "LifecycleRule", "Selection", "load_lifecycle_policy"]

MAX_WILDCARDS = 4
#: Values of ECR's archive tier, and why each is refused here.
_ARCHIVE_TIER = {
    "archive": "every cached image is standard",
    "sinceImageTransitioned": "no image is ever transitioned",
    "transition": "there is nowhere to move images to; use expire",
}


def _no_archive_tier(value: object) -> object:
    """A value of ECR's archive tier refused saying why, not as an unknown value."""
    if isinstance(value, str) and value in _ARCHIVE_TIER:
        raise ValueError(f"{value}: the cache has no archive tier: {_ARCHIVE_TIER[value]}")
    return value


class LifecyclePolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the rule's key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selection(_Strict):
    tagStatus: Literal["tagged", "untagged", "any"]  # ECR's own key names
    tagPrefixList: tuple[str, ...] | None = None
    tagPatternList: tuple[str, ...] | None = None
    countType: Annotated[
        Literal["imageCountMoreThan", "sinceImagePushed", "sinceImagePulled"], BeforeValidator(_no_archive_tier)
    ]
    countUnit: Literal["days"] | None = None
    countNumber: StrictInt = Field(ge=1)
    #: ECR's storage class of the images selected: every cached image is ``standard``.
    storageClass: Annotated[Literal["standard"] | None, BeforeValidator(_no_archive_tier)] = None

    @model_validator(mode="after")
    def _ecr_rules(self) -> Selection:
        lists = [name for name in ("tagPrefixList", "tagPatternList") if getattr(self, name) is not None]
        if self.tagStatus == "tagged":
            if len(lists) != 1:
                raise ValueError("tagStatus tagged needs exactly one of tagPrefixList and tagPatternList")
            values = self.tagPrefixList or self.tagPatternList or ()
            if not values or any(not value for value in values):
                raise ValueError(f"{lists[0]} must hold at least one non-empty entry")
        elif lists:
            raise ValueError(f"tagStatus {self.tagStatus} takes no {' or '.join(lists)} (only tagged does)")
        for pattern in self.tagPatternList or ():
            if pattern.count("*") > MAX_WILDCARDS:
                raise ValueError(f"tagPatternList entry {pattern!r} has more than {MAX_WILDCARDS} wildcards (*)")
        if self.countType == "imageCountMoreThan" and self.countUnit is not None:
            raise ValueError("countUnit goes only with sinceImagePushed and sinceImagePulled")
        if self.countType != "imageCountMoreThan" and self.countUnit is None:
            raise ValueError(f"countType {self.countType} needs countUnit (days)")
        return self

    def matches(self, tags: frozenset[str]) -> bool:
        """Whether an image with these tags is one this selection identifies (ECR: every
        entry of the list is matched by at least one of the image's tags)."""
        if self.tagStatus == "any":
            return True
        if self.tagStatus == "untagged":
            return not tags
        if not tags:
            return False
        if self.tagPrefixList is not None:
            return all(any(tag.startswith(prefix) for tag in tags) for prefix in self.tagPrefixList)
        return all(any(_pattern(p).fullmatch(tag) for tag in tags) for p in self.tagPatternList or ())


def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in text.split("*")))


class Action(_Strict):
    type: Annotated[Literal["expire"], BeforeValidator(_no_archive_tier)]


class LifecycleRule(_Strict):
    rulePriority: StrictInt = Field(ge=1)
    description: str = ""
    selection: Selection
    action: Action

    @property
    def name(self) -> str:
        described = f" ({self.description})" if self.description else ""
        return f"rule {self.rulePriority}{described}"


class LifecyclePolicy(_Strict):
    rules: tuple[LifecycleRule, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _ecr_policy_rules(self) -> LifecyclePolicy:
        priorities = [rule.rulePriority for rule in self.rules]
        repeated = sorted({p for p in priorities if priorities.count(p) > 1})
        if repeated:
            raise ValueError(f"rulePriority must be unique; repeated: {', '.join(map(str, repeated))}")
        highest = max(priorities)
        for rule in self.rules:
            if rule.selection.tagStatus == "any" and rule.rulePriority != highest:
                raise ValueError(
                    f"rule {rule.rulePriority} has tagStatus any, so it must have the highest rulePriority"
                )
        untagged = [r.rulePriority for r in self.rules if r.selection.tagStatus == "untagged"]
        if len(untagged) > 1:
            raise ValueError(f"only one rule may select untagged images; rules {untagged} do")
        prefixes: dict[str, int] = {}
        for rule in self.rules:
            for prefix in rule.selection.tagPrefixList or ():
                if prefix in prefixes:
                    raise ValueError(
                        f"tag prefix {prefix!r} appears in rules {prefixes[prefix]} and {rule.rulePriority}; "
                        "each prefix belongs to one rule"
                    )
                prefixes[prefix] = rule.rulePriority
        return self

    @property
    def ordered(self) -> tuple[LifecycleRule, ...]:
        return tuple(sorted(self.rules, key=lambda rule: rule.rulePriority))


def load_lifecycle_policy(path: Path) -> LifecyclePolicy:
    """Read and check a policy file; every problem is a :class:`LifecyclePolicyError` naming
    the file and the key (``rules[1].selection.countUnit``)."""
    try:
        text = read_text(path)
    except UnreadableFile as exc:
        raise LifecyclePolicyError(f"{path}: cannot read the file: {exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise LifecyclePolicyError(f"{path}: not valid JSON: {exc}") from None
    try:
        return LifecyclePolicy.model_validate(document)
    except ValidationError as exc:
        problems = [
            _with_priority(describe_error(error), error["loc"], document) for error in without_echoes(exc.errors())
        ]
        raise LifecyclePolicyError(f"{path}: " + "; ".join(problems)) from None


def _with_priority(line: str, where: tuple[int | str, ...], document: object) -> str:
    """``rules[1]…`` as ``rules[1] (rulePriority 20)…``: preview and the logs name rules by
    priority, and with priorities 10, 20, 30 a position is easily misread as one."""
    if len(where) < 2 or where[0] != "rules" or not isinstance(where[1], int) or not isinstance(document, dict):
        return line
    rules = document.get("rules")
    entry = rules[where[1]] if isinstance(rules, list) and where[1] < len(rules) else None
    priority = entry.get("rulePriority") if isinstance(entry, dict) else None
    if not isinstance(priority, int) or isinstance(priority, bool):
        return line
    position = f"rules[{where[1]}]"
    return line.replace(position, f"{position} (rulePriority {priority})", 1)
