"""Consumers of the generation log that run beside the broker.

This package holds what services need to *discover* generations (the catalog follower).  The
durable consumer runtime (consumer groups over the catalog, sentence logger, analytics) is
built on it.
"""

from consumers.catalog import Announcement, follow_catalog

__all__ = ["Announcement", "follow_catalog"]
