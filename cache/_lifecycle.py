"""ECR lifecycle policies applied to the cached images of each repository.

An *image* is a manifest cached for a repository of an upstream: its tags are the cached tags
pointing at it, its push time is when it was first cached there, its pull time when a client
last pulled it, or any part of it, through the cache. A multi-platform index and its platform
manifests are one image (an index within it and what that holds too), and so are an image and
its referrers (signatures, SBOMs) with no tags of their own: its parts are not judged alone,
and go with it, but for those an image that stays also carries (see :func:`_fold_platforms`).

Evaluation follows ECR (see :func:`evaluate`): every rule identifies the images its tag
criteria match and picks, among those, the ones its count criteria condemn; rules then apply
in priority order, and an image identified by a higher-priority rule is never expired by a
lower one, even when that rule kept it. Expiring drops the image's tags and records from the
index; blobs no remaining manifest reaches leave the store at once (those read in the last
seconds or being filled stay until the next garbage collection). Blocking functions; the cache
runs them in a thread.
"""

from __future__ import annotations

import fnmatch
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from moorage.config import (
    LifecyclePolicy,
    LifecyclePolicyError,
    LifecycleRule,
    UpstreamSettings,
    load_lifecycle_policy,
)
from moorage.upstreams.reference import MAX_MANIFEST_BYTES, Digest, InvalidReference, parse_digest

from ._evict import ReadGuard, release
from ._gc import mark, references, subject_of
from ._index import Index, tag_entry
from ._keys import IndexKey, blob_key, image_key, image_pulled_key, manifest_key, pulled_key, referrers_key, routes_key
from ._layout import index_dir
from ._store import BlobStore, DirectoryStore

__all__ = [
    "CachedImage",
    "Expiry",
    "LifecycleResult",
    "PolicyFor",
    "apply_expiries",
    "evaluate",
    "plan",
    "policy_resolver",
    "preview",
]

DAY = 86400.0

#: The policy for an (upstream host, repository), None when none applies.
PolicyFor = Callable[[str, str], LifecyclePolicy | None]


@dataclass(frozen=True, slots=True)
class CachedImage:
    upstream: str
    repository: str
    digest: Digest
    tags: frozenset[str]
    #: First cached for this repository (ECR's push time), epoch seconds.
    pushed_at: float
    #: Last pulled through the cache; None when never (ECR then uses the push time).
    pulled_at: float | None = None
    #: What goes with it, cached for the repository: the manifests of an index (those of an
    #: index it holds too), and the referrers (signatures, SBOMs) that name it or one of them.
    children: tuple[Digest, ...] = ()
    #: The manifest it names as its subject, for a referrer.
    subject: Digest | None = None

    @property
    def name(self) -> str:
        tags = ",".join(sorted(self.tags)) or "<untagged>"
        return f"{self.upstream}/{self.repository}@{self.digest} [{tags}]"


@dataclass(frozen=True, slots=True)
class Expiry:
    image: CachedImage
    rule: LifecycleRule
    #: Of its children, those an image of the repository that stays carries too (an index
    #: tagged anew over some of the same platform manifests): they stay with that image.
    shared: frozenset[Digest] = frozenset()
    #: Of its tags, those no image of the repository that stays has: every answer of these
    #: goes with it (see :func:`apply_expiries`).
    tags_going: frozenset[str] = frozenset()

    @property
    def going(self) -> list[Digest]:
        """The expired image and the children it takes with it: not those an image that stays
        carries too."""
        return [digest for digest in (self.image.digest, *self.image.children) if digest not in self.shared]

    @property
    def reason(self) -> str:
        selection = self.rule.selection
        if selection.countType == "imageCountMoreThan":
            why = f"more than {selection.countNumber} image{'s' if selection.countNumber != 1 else ''} match"
        elif selection.countType == "sinceImagePushed":
            why = f"first cached more than {selection.countNumber} days ago"
        else:
            why = f"not pulled for more than {selection.countNumber} days"
        return f"{self.rule.name}: {why}"


@dataclass
class LifecycleResult:
    expired: list[Expiry] = field(default_factory=list)
    #: Tag answers dropped from the index (the in-memory front must forget them too).
    dropped_tags: list[IndexKey] = field(default_factory=list)
    removed: list[Digest] = field(default_factory=list)
    freed_bytes: int = 0


def evaluate(policy: LifecyclePolicy, images: Iterable[CachedImage], now: float) -> list[Expiry]:
    """What ECR would expire among one repository's images (pure; ``now`` in epoch seconds)."""
    images = list(images)
    seen: set[Digest] = set()  # identified by a rule of higher priority
    expired: dict[Digest, Expiry] = {}
    for rule in policy.ordered:
        selection = rule.selection
        identified = [image for image in images if selection.matches(image.tags)]
        if selection.countType == "imageCountMoreThan":
            youngest_first = sorted(identified, key=lambda image: image.pushed_at, reverse=True)
            condemned = youngest_first[selection.countNumber :]
        else:
            limit = now - selection.countNumber * DAY
            if selection.countType == "sinceImagePushed":
                condemned = [image for image in identified if image.pushed_at < limit]
            else:
                condemned = [image for image in identified if (image.pulled_at or image.pushed_at) < limit]
        for image in sorted(condemned, key=lambda image: image.pushed_at):  # oldest first, as ECR
            if image.digest not in seen and image.digest not in expired:
                expired[image.digest] = Expiry(image, rule)
        seen.update(image.digest for image in identified)
    staying = {part for image in images if image.digest not in expired for part in (image.digest, *image.children)}
    staying_tags = {tag for image in images if image.digest not in expired for tag in image.tags}
    return sorted(
        (
            replace(
                expiry,
                shared=frozenset(staying.intersection(expiry.image.children)),
                tags_going=expiry.image.tags - staying_tags,
            )
            for expiry in expired.values()
        ),
        key=lambda expiry: expiry.image.pushed_at,
    )


def read_images(
    store: BlobStore, index: Index, covered: Callable[[str, str], bool] = lambda upstream, repository: True
) -> dict[tuple[str, str], list[CachedImage]]:
    """Every cached image of the repositories ``covered`` selects, by (upstream, repository);
    one walk of the index, and a read of those images' manifests alone. Blocks."""
    pushed: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    pulled: dict[tuple[str, str, str], float] = {}
    #: By repository and tag, the digest each answer names and when the upstream last confirmed
    #: it, by the class of client it answers (``index`` for those that take an index, ``image``
    #: for those that take none).
    answers: dict[tuple[str, str], dict[str, dict[str, tuple[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in index.entries(frozenset({"image", "image-pulled", "tag"})):
        kind, upstream, repository = key[0], key[1], key[2]
        if kind == "image" and isinstance(value, int | float):
            pushed[upstream, repository][key[3]] = float(value)
        elif kind == "image-pulled" and isinstance(value, int | float):
            pulled[upstream, repository, key[3]] = float(value)
        elif kind == "tag" and (entry := tag_entry(value)) is not None:  # one it cannot read is refetched
            tagged = str(entry.digest)
            answers[upstream, repository][key[3]][str(key[4])] = (tagged, float(entry.checked_at))
            known = pushed[upstream, repository]
            known.setdefault(tagged, float(entry.checked_at))  # a tag cached before image records were kept
    images: dict[tuple[str, str], list[CachedImage]] = {}
    for (upstream, repository), digests in pushed.items():
        if not covered(upstream, repository):
            continue
        found: list[CachedImage] = []
        for digest_text, pushed_at in digests.items():
            try:
                digest = parse_digest(digest_text)
            except InvalidReference:
                continue
            if not index.has_manifest(digest):
                continue  # evicted or quarantined meanwhile: no longer an image of the cache
            body = store.read_small(digest, MAX_MANIFEST_BYTES)
            children = tuple(references(body)[0]) if body is not None else ()
            subject = subject_of(body) if body is not None else None
            found.append(
                CachedImage(
                    upstream,
                    repository,
                    digest,
                    frozenset(),
                    pushed_at,
                    pulled.get((upstream, repository, digest_text)),
                    children,
                    subject,
                )
            )
        tags = _tags_by_digest(answers.get((upstream, repository), {}), found)
        found = [replace(image, tags=frozenset(tags.get(str(image.digest), ()))) for image in found]
        images[upstream, repository] = _fold_platforms(found)
    return images


def _tags_by_digest(answers: dict[str, dict[str, tuple[str, float]]], images: list[CachedImage]) -> dict[str, set[str]]:
    """The tags of each digest of a repository, from each tag's answers (``answers``: by tag,
    the digest named for each class of client, and when the upstream last confirmed it).

    A tag's answer for clients that take no index names one platform's manifest of the image
    its answer for the others names. Where the two name different images, the tag moved since
    clients of one kind last asked: its current answer is the one confirmed last (the one for
    clients that take indexes, on a tie). The tag is that answer's manifest's, and another
    answer's only where it names a part of it or holds it. Kept as the tag's, an old release's
    platform manifest was judged alone and expired while the index listing it stayed; taken
    for the current one, a stale answer made the image the tag names now untagged.

    Only the answers' own manifests take the tag: a platform manifest several releases share
    gave it to every cached index holding it, and no rule ever expired an old release again
    (nor did a quadratic pass end soon over thousands of them)."""
    children_of = {str(image.digest): [str(child) for child in image.children] for image in images}
    holdings: dict[str, set[str]] = {}

    def holding(whole: str) -> set[str]:
        """``whole`` and everything it holds, through what it holds; once per digest."""
        if whole not in holdings:
            found: set[str] = set()
            waiting = [whole]
            while waiting:
                digest = waiting.pop()
                if digest not in found:
                    found.add(digest)
                    waiting.extend(children_of.get(digest, ()))
            holdings[whole] = found
        return holdings[whole]

    tags: dict[str, set[str]] = defaultdict(set)
    for tag, by_class in answers.items():
        _, (current, _) = max(by_class.items(), key=lambda item: (item[1][1], item[0] == "index"))
        for digest, _ in by_class.values():
            if digest in holding(current) or current in holding(digest):
                tags[digest].add(tag)
    return tags


def _fold_platforms(images: list[CachedImage]) -> list[CachedImage]:
    """A platform manifest the indexes of the repository refer to is part of each of those
    images when it has no tags they all lack (a tag cached for old clients as the platform
    manifest is the same tag; two releases sharing their amd64 manifest, each tag answered to
    old clients with it, share it); so is an index within the index, with what it holds, and
    a referrer (a signature, an SBOM) of any of them with no tags of its own. The image then
    carries them as children, and none is judged alone: expired alone, an inner index's
    platform manifests stayed behind for good, and an untagged-images rule took an image's
    signatures from it."""
    tags_of = {image.digest: image.tags for image in images}
    folded: dict[Digest, set[Digest]] = {}
    listed_by: dict[Digest, list[CachedImage]] = defaultdict(list)
    for parent in images:
        for child in parent.children:
            if child in tags_of and child != parent.digest:
                listed_by[child].append(parent)
    for child, parents in listed_by.items():
        if tags_of[child] <= frozenset().union(*(parent.tags for parent in parents)):
            for parent in parents:
                folded.setdefault(parent.digest, set()).add(child)
    for referrer in images:
        subject = referrer.subject
        if subject in tags_of and subject != referrer.digest and referrer.tags <= tags_of[subject]:
            folded.setdefault(subject, set()).add(referrer.digest)
    absorbed = {child for children in folded.values() for child in children}

    def carried(digest: Digest) -> set[Digest]:
        """What ``digest`` carries, through what it carries."""
        found: set[Digest] = set()
        waiting = list(folded.get(digest, ()))
        while waiting:
            child = waiting.pop()
            if child not in found and child != digest:
                found.add(child)
                waiting.extend(folded.get(child, ()))
        return found

    pulled_of = {image.digest: image.pulled_at for image in images if image.pulled_at is not None}
    whole = [(image, carried(image.digest)) for image in images if image.digest not in absorbed]
    # Parts that name each other (an index listing a manifest that names the index as its
    # subject: odd content, or hostile) are carried by no image: one of them, tagged first,
    # then the first cached, carries the rest, so that none is lost and none goes alone.
    reached = {part for image, children in whole for part in (image.digest, *children)}
    for image in sorted(images, key=lambda image: (not image.tags, image.pushed_at, str(image.digest))):
        if image.digest not in reached:
            children = carried(image.digest) - reached
            whole.append((image, children))
            reached |= {image.digest, *children}
    # A pull of a platform manifest (pods pinned to its digest) is a pull of the image. One
    # that several images carry (a release reusing the last one's arm64 manifest) cannot tell
    # which it was for: it counts for each of them that is tagged, and for the newest. Counted
    # for every one, it kept an untagged old release in use for as long as the newest was;
    # counted for the newest alone, a look at a newer candidate made the tagged release in
    # use look unpulled.
    carriers: dict[Digest, list[CachedImage]] = defaultdict(list)
    for image, children in whole:
        for child in children:
            carriers[child].append(image)
    newest = {part: max(images, key=lambda i: (i.pushed_at, str(i.digest))) for part, images in carriers.items()}

    def counts_for(image: CachedImage, part: Digest) -> bool:
        return len(carriers.get(part, ())) <= 1 or bool(image.tags) or newest[part] is image

    return [
        replace(
            image,
            children=tuple(sorted(children, key=str)),
            pulled_at=max(
                (pulled_of[d] for d in (image.digest, *children) if d in pulled_of and counts_for(image, d)),
                default=image.pulled_at,
            ),
        )
        for image, children in whole
    ]


def plan(
    store: BlobStore,
    index: Index,
    policy_for: PolicyFor,
    now: float,
    *,
    wanted: Callable[[str, str], bool] = lambda upstream, repository: True,
    unreadable: set[str] | None = None,
) -> list[Expiry]:
    """What the policies expire now, over every repository ``wanted`` selects. Blocks.

    A policy file that cannot be read raises, unless ``unreadable`` collects its error: then
    the repositories it binds are left as they are, and every other policy still applies."""

    def covered(upstream: str, repository: str) -> bool:
        """Whether a policy may expire the repository's images: only those images' manifests
        are read (every manifest of a store of 100,000 tags had been, for a policy of one)."""
        if not wanted(upstream, repository):
            return False
        try:
            return policy_for(upstream, repository) is not None
        except LifecyclePolicyError:
            return True  # said below, as the repository comes up

    expiries: list[Expiry] = []
    for (upstream, repository), images in sorted(read_images(store, index, covered).items()):
        try:
            policy = policy_for(upstream, repository)
        except LifecyclePolicyError as error:
            if unreadable is None:
                raise
            unreadable.add(str(error))
            continue
        if policy is not None:
            expiries.extend(evaluate(policy, images, now))
    return expiries


def apply_expiries(
    store: DirectoryStore,
    index: Index,
    expiries: list[Expiry],
    *,
    protected: frozenset[Digest] = frozenset(),
    guard: ReadGuard | None = None,
    planned_at: float | None = None,
) -> LifecycleResult:
    """Expire images: drop their tags and records, then remove the blobs nothing else reaches.
    ``planned_at``: the time ``expiries`` were planned at (the clock tag answers are stamped
    with); an answer confirmed since is a client's pull during the pass, kept. Blocks."""
    result = LifecycleResult(expired=list(expiries))
    if not expiries:
        return result
    gone: set[Digest] = set()
    for expiry in expiries:
        image = expiry.image
        for digest in expiry.going:
            keys: list[IndexKey] = [
                image_key(image.upstream, image.repository, digest),
                image_pulled_key(image.upstream, image.repository, digest),
                referrers_key(image.upstream, image.repository, digest, ""),  # its signatures there
            ]
            index.delete(keys)
            gone.add(digest)
    # Tag answers pointing at an expired image in its repository, whatever the accept class:
    # at its index, or at a platform manifest it carries (the answer for clients that take
    # no index), which would otherwise keep that part of the image, and its layers, behind.
    # And every answer of a tag the expired image had and no image that stays has, whatever it
    # names: the tag expired. An answer for the other class of clients left behind (one the
    # tag had moved away from, or a platform manifest the staying release shares) made its
    # manifest the tag again at the next pass, judged alone. A tag an image that stays has
    # keeps its answers but those naming what goes.
    expired_in = {(e.image.upstream, e.image.repository, str(digest)) for e in expiries for digest in e.going}
    expired_tags = {(e.image.upstream, e.image.repository, tag) for e in expiries for tag in e.tags_going}
    tag_keys: list[IndexKey] = []
    answered: set[IndexKey] = set()  # tags an answer is left for
    for key, value in index.entries(frozenset({"tag"})):
        if (entry := tag_entry(value)) is None:
            answered.add(pulled_key_of(key))  # one it cannot read is refetched, and replaced
            continue
        planned = planned_at is None or entry.checked_at < planned_at  # not a pull during the pass
        if (key[1], key[2], str(entry.digest)) in expired_in or ((key[1], key[2], key[3]) in expired_tags and planned):
            tag_keys.append(key)
        else:
            answered.add(pulled_key_of(key))
    # A tag's pull time is the tag's, whichever class of client pulled it: it goes with its
    # last answer (``moorage ls`` showed none for a tag still cached for the others).
    pulled_keys = {pulled_key_of(key) for key in tag_keys} - answered
    index.delete([*tag_keys, *pulled_keys])
    result.dropped_tags = tag_keys
    # A manifest still cached for another repository (or tagged there) stays.
    still_used = {
        str(value[0]) if key[0] == "tag" and isinstance(value, tuple) else key[3]
        for key, value in index.entries(frozenset({"image", "tag"}))
    }
    unused = {digest for digest in gone if str(digest) not in still_used}
    index.delete([manifest_key(digest) for digest in unused])
    roots = index.manifest_digests()
    reachable = mark(store, roots)
    candidates = mark(store, map(str, unused)) - reachable
    reachable |= mark(store, index.manifest_digests() - roots)  # manifests stored meanwhile
    guard = guard or ReadGuard()
    for digest in map(parse_digest, sorted(candidates - reachable)):
        if digest in protected:
            continue
        size = guard.remove_unless_read(store.path_of(digest), digest)
        if size is None:
            continue  # read in the last seconds: left for the next garbage collection
        result.removed.append(digest)
        result.freed_bytes += size
    index.delete([key for digest in result.removed for key in (blob_key(digest), routes_key(digest))])
    release(reachable)
    return result


def preview(
    root: Path,
    upstreams: Iterable[UpstreamSettings],
    *,
    upstream: str | None = None,
    repository: str | None = None,
    now: float | None = None,
    unreadable: set[str] | None = None,
) -> list[Expiry]:
    """``moorage lifecycle preview``: what a pass would expire now, changing nothing. Blocks;
    safe beside a serving daemon. A policy file that cannot be read raises, unless
    ``unreadable`` collects its error, as a pass does (see :func:`plan`)."""

    def wanted(host: str, name: str) -> bool:
        return upstream in (None, host) and (repository is None or fnmatch.fnmatchcase(name, repository))

    store = DirectoryStore(root)
    index = Index(index_dir(root))
    try:
        return plan(
            store,
            index,
            policy_resolver(upstreams),
            time.time() if now is None else now,
            wanted=wanted,
            unreadable=unreadable,
        )
    finally:
        index.close()


def pulled_key_of(tag_index_key: IndexKey) -> IndexKey:
    """The pull-time key of the tag a tag answer is for."""
    _, upstream, repository, tag, _accept = tag_index_key
    return pulled_key(upstream, repository, tag)


def policy_resolver(upstreams: Iterable[UpstreamSettings]) -> PolicyFor:
    """A :data:`PolicyFor` from the upstreams' settings: the first binding whose glob matches
    the repository. Each policy file is read once per resolver (one resolver per pass), so an
    edited file applies at the next pass; an unreadable one raises LifecyclePolicyError."""
    bindings = {upstream.host: upstream.lifecycle for upstream in upstreams}
    loaded: dict[tuple[str, int], LifecyclePolicy | LifecyclePolicyError] = {}

    def policy_for(upstream: str, repository: str) -> LifecyclePolicy | None:
        for position, binding in enumerate(bindings.get(upstream, ())):
            if fnmatch.fnmatchcase(repository, binding.repositories):
                if (upstream, position) not in loaded:
                    try:
                        loaded[upstream, position] = load_lifecycle_policy(binding.policy_file)
                    except LifecyclePolicyError as error:  # read once per pass, as a good file is
                        loaded[upstream, position] = error
                found = loaded[upstream, position]
                if isinstance(found, LifecyclePolicyError):
                    raise found
                return found
        return None

    return policy_for
