"""The options of a subscription that change a delivery (MQTT 5.0): below the trie, which
keeps them per subscriber, and the router, which merges them per client."""

from __future__ import annotations

import attrs


@attrs.frozen(slots=True)
class SubOptions:
    """The per-subscription options that change a delivery (5.0 subscriptions only; a
    subscription with none of them set has no SubOptions at all)."""

    no_local: bool = False
    retain_as_published: bool = False
    subscription_ids: tuple[int, ...] = ()

    def merged(self, other: SubOptions | None) -> SubOptions:
        """One delivery for two matching subscriptions of one client: No Local only if both
        say so, RETAIN as published if either does, every subscription identifier."""
        if other is None:
            return SubOptions(False, self.retain_as_published, self.subscription_ids)
        ids = tuple(sorted(set(self.subscription_ids) | set(other.subscription_ids)))
        return SubOptions(
            self.no_local and other.no_local,
            self.retain_as_published or other.retain_as_published,
            ids,
        )

    @classmethod
    def of(cls, no_local: bool, retain_as_published: bool, subscription_id: int
           ) -> SubOptions | None:
        if not (no_local or retain_as_published or subscription_id):
            return None
        return cls(no_local, retain_as_published, (subscription_id,) if subscription_id else ())
