"""Which images a run covers: ``--ids``, ``--shard I/N`` and ``--limit``."""
from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): a deterministic, coordination-free partition."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like I/N (e.g. 3/8), got {text!r}") from None
        if not 1 <= index <= count:
            raise ValueError(f"--shard I/N needs 1 <= I <= N, got {text!r}")
        return cls(index, count)

    def owns(self, image_id: str) -> bool:
        """Whether ``image_id`` belongs to this shard: CRC-32 of the id, modulo the count.

        Depends on nothing but the id, so every shard agrees without talking to the others,
        whatever subset (``--ids``, ``--limit``) each was given.
        """
        return zlib.crc32(image_id.encode("utf-8")) % self.count == self.index - 1

    @property
    def tag(self) -> str:
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"


def select_ids(
    available: list[str],
    *,
    wanted: list[str] | None = None,
    shard: Shard = Shard(),
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """The ids to run, in sorted order, and the wanted ids the cams file does not hold.

    ``wanted`` (an ``--ids`` list) restricts ``available``; then the shard keeps its own ids;
    then ``limit`` keeps the first ones.
    """
    missing: list[str] = []
    if wanted is not None:
        present = set(available)
        missing = [i for i in wanted if i not in present]
        ids = sorted(i for i in set(wanted) if i in present)
    else:
        ids = sorted(available)
    ids = [i for i in ids if shard.owns(i)]
    if limit is not None:
        ids = ids[:limit]
    return ids, missing
