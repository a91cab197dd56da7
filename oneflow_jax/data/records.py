"""Reading ArrayRecord shards that may be damaged (a bad disk, a truncated copy, a partial upload): every reader of
records goes through here, so that what cannot be read is skipped and counted, never fatal, until too much is lost.

  * `open_shards(paths)`: opens each shard on its own. A shard that cannot be opened at all (unreadable footer, zero
    length, missing) is skipped whole, with its path and an estimate of the records lost (its bytes at the readable
    shards' bytes per record) in the log; `ShardSet.unreadable` lists them.
  * `ShardSet.read(i)`: record i's bytes, or None where its chunk fails its checksum; `ShardSet.records()` is the
    Grain MapDataset of them (None -> a `{"skip": "unreadable"}` marker that the train pipeline counts).
  * `check_loss(lost, total, max_fraction)`: a ValueError with one clear line once the unreadable fraction passes
    `data.max_unreadable_fraction` (default 0.05), so that silent mass loss is impossible.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import grain

DEFAULT_MAX_UNREADABLE = 0.05
MIN_RECORDS_TO_JUDGE = 200      # records read before a partial read's unreadable fraction is judged
UNREADABLE = "unreadable"


@dataclasses.dataclass
class ShardSet:
    """The readable shards of a split, as one indexable source, and what could not be opened."""
    paths: list[str]
    source: object | None                     # ArrayRecordDataSource over `paths` (None if none is readable)
    unreadable: list[dict]                    # [{path, error, bytes, records_lost_estimate}]

    def __len__(self) -> int:
        return 0 if self.source is None else len(self.source)

    @property
    def records_lost_estimate(self) -> int:
        return sum(u["records_lost_estimate"] for u in self.unreadable)

    def read(self, index: int) -> bytes | None:
        """Record `index`'s bytes, or None if its chunk cannot be read (logged)."""
        try:
            return self.source[index]
        except Exception as e:  # pylint: disable=broad-except  (Riegeli raises RuntimeError, others OSError)
            logging.warning("unreadable record %d: %s", index, _first_line(e))
            return None

    def records(self) -> grain.MapDataset:
        """The records as a MapDataset: bytes, or a skip marker where unreadable."""
        return _SafeRecords(self)


class _SafeRecords(grain.MapDataset):
    def __init__(self, shards: ShardSet):
        super().__init__()
        self._shards = shards

    def __len__(self) -> int:
        return len(self._shards)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        raw = self._shards.read(index % len(self._shards))
        return {"skip": UNREADABLE} if raw is None else raw

    def __str__(self) -> str:
        return "SafeRecords"


def open_shards(paths: Sequence[str], max_unreadable_fraction: float = DEFAULT_MAX_UNREADABLE) -> ShardSet:
    """Opens each shard on its own, skipping (and logging) those that cannot be opened; raises ValueError when the
    estimated records lost pass `max_unreadable_fraction` of the split, or when no shard can be read."""
    from array_record.python import array_record_data_source as ards  # pylint: disable=g-import-not-at-top
    good, bad, good_records, good_bytes = [], [], 0, 0
    for path in paths:
        try:
            n = len(ards.ArrayRecordDataSource([os.fspath(path)]))
        except Exception as e:  # pylint: disable=broad-except
            size = os.path.getsize(path) if os.path.exists(path) else 0
            bad.append(dict(path=os.fspath(path), error=_first_line(e), bytes=size))
            continue
        good.append(os.fspath(path))
        good_records += n
        good_bytes += os.path.getsize(path)
    per_byte = good_records / good_bytes if good_bytes else 0.0
    for b in bad:
        b["records_lost_estimate"] = int(round(b["bytes"] * per_byte))
        logging.warning("skipping unreadable shard %s (~%d records lost): %s", b["path"], b["records_lost_estimate"],
                        b["error"])
    shards = ShardSet(good, ards.ArrayRecordDataSource(good) if good else None, bad)
    if not good:
        raise ValueError(f"no readable shard among {len(paths)}: {bad[0]['path'] if bad else '(none given)'}: "
                         f"{bad[0]['error'] if bad else ''}")
    check_loss(shards.records_lost_estimate, good_records + shards.records_lost_estimate, max_unreadable_fraction,
               f"{len(bad)} unreadable shard(s), e.g. {bad[0]['path']}" if bad else "")
    return shards


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(e).__name__


def check_loss(lost: int, total: int, max_fraction: float, what: str = "") -> None:
    """ValueError (one line) when `lost` / `total` records passes `max_fraction`."""
    if total > 0 and lost / total > max_fraction:
        raise ValueError(f"{lost} of {total} records ({lost / total:.1%}) are unreadable"
                         + (f" ({what})" if what else "") + f", more than data.max_unreadable_fraction="
                         f"{max_fraction:g}; repair or regenerate the dataset, or raise the threshold")
