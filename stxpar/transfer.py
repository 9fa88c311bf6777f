"""One transfer as both cores and the receiver's shell see it: METADATA's header and the manifest.

Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .manifest import Header, Manifest


@dataclass(frozen=True, eq=False)
class Transfer:
    """What a session moves: ``header`` (METADATA) and ``manifest`` (its MANIFEST chunks)."""

    header: Header
    manifest: Manifest

    @property
    def name(self) -> str:
        """How the transfer is named to people: its one top-level name, or them all."""
        roots = self.manifest.roots
        return roots[0] if len(roots) == 1 else ", ".join(roots)

    @property
    def size(self) -> int:
        """Bytes of data to move (holes of sparse files are not data)."""
        return self.manifest.data_bytes

    @property
    def total_blocks(self) -> int:
        return self.manifest.space.total

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def streams(self) -> int:
        return self.header.streams

    @property
    def rekey_records(self) -> int:
        return self.header.rekey_records

    @property
    def rekey_bytes(self) -> int:
        return self.header.rekey_bytes

    @property
    def file_id(self) -> bytes:
        """The transfer's identity for superseding: the manifest's id (same sources, same id)."""
        return self.manifest.id
