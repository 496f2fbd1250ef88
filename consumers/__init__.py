"""Durable consumers of the generation log.

A consumer type (:class:`ConsumerType`) is a Redis consumer group on the catalog: its workers
share the generations, each processes its generations in order with checkpoints committed
atomically with its effects, and a crashed worker's generations are taken over.  Two types
ship with tokentee: the sentence logger (:class:`Sentences`) and the analytics counter
(:class:`Analytics`).  The catalog follower (:func:`follow_catalog`) is for services that
only want to discover generations.
"""

# The broker package imports this one (the in-process workers of ``tokentee serve``);
# importing it first makes ``import consumers`` work on its own as well.
import broker  # noqa: F401
from consumers.catalog import Announcement, follow_catalog
from consumers.runtime import ConsumerType, Generation, Worker, running_workers
from consumers.store import ConsumerStore

__all__ = [
    "Announcement",
    "ConsumerStore",
    "ConsumerType",
    "Generation",
    "Worker",
    "follow_catalog",
    "running_workers",
]
