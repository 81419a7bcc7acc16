"""Online aggregates: each entity's recent events in state shared by every server process, and the
spec's aggregates computed from them as of each request's time.

The value served for an event at time t is what the offline transformation (`features.aggregates`)
computes for an event at t: windows [t - w, t) of strictly earlier events, a label only once its
event is `label_delay` old (and the label has arrived), time since the entity's previous event.
The state holds the events themselves, not running sums or tiles, so every aggregate is exact at any
t: docs/serving.md has the measurements behind that choice. Each event scored is recorded (once per
id), late labels update it, and a batch that lands replaces the days it covers.

Two backends share one interface: SQLite in WAL mode (the embedded default: one file under the
table's home, one transaction per micro-batch, so every process of a server sees the same state)
and Redis (past one machine).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate.features import catalog
from sluicegate.spec import Aggregate, DatasetSpec

DAY_NS = 86_400 * 10**9
MMAP_BYTES = 1 << 30
CACHE_KIB = 65_536
RECONCILE_KEYS = 2_000  # entity keys a landing batch replaces per transaction of the SQLite state
CHECKPOINT_SECONDS = 1.0  # the server's checkpoints run this often, in a thread
CHECKPOINT_PAGES = 4_000  # 16 MB of WAL between checkpoints (each syncs the file): fewer, larger ones
# Events scored together by a replay, as the server's micro-batcher scores them.
REPLAY_BATCH = 64


class OutsideState(ValueError):
    """An event the state cannot score exactly: it is older than what the state keeps for its entity."""


@dataclass(frozen=True)
class Event:
    id: str
    ts: int  # nanoseconds since the epoch, UTC
    keys: dict[str, str]  # entity name -> key value, as text
    values: tuple[float, ...]  # the aggregated columns (`OnlineFeatures.value_columns`), NaN where missing
    label: float = np.nan  # 1.0 / 0.0 once known


class History:
    """One entity key's events in time order, as arrays: times, 64-bit hashes of their ids (`id_hash`),
    labels and aggregated values."""

    __slots__ = ("ts", "ids", "labels", "values", "held")

    def __init__(self, ts: np.ndarray, ids: np.ndarray, labels: np.ndarray, values: np.ndarray):
        self.ts, self.ids, self.labels, self.values = ts, ids, labels, values
        self.held = set(ids.tolist())

    @classmethod
    def empty(cls, width: int) -> History:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty((0, width)))

    def holds(self, event_id: str) -> bool:
        return id_hash(event_id) in self.held

    def add(self, event: Event) -> None:
        at = int(np.searchsorted(self.ts, event.ts, side="right"))
        hashed = id_hash(event.id)
        # Concatenated by hand: np.insert's axis handling costs more than the copy at these sizes.
        self.ts = np.concatenate((self.ts[:at], np.array([event.ts], np.int64), self.ts[at:]))
        self.ids = np.concatenate((self.ids[:at], np.array([hashed], np.int64), self.ids[at:]))
        self.labels = np.concatenate((self.labels[:at], np.array([event.label], np.float64), self.labels[at:]))
        self.values = np.concatenate((self.values[:at], np.array([event.values], np.float64), self.values[at:]))
        self.held.add(hashed)

    def keep(self, rows) -> History:
        """The events at `rows` (a slice or a boolean mask)."""
        return History(self.ts[rows], self.ids[rows], self.labels[rows], self.values[rows])


def id_hash(event_id: str) -> int:
    """An event id as 64 bits: what the state keeps per event to recognise a retry (two distinct ids
    collide with probability 2**-64)."""
    return int.from_bytes(hashlib.blake2b(str(event_id).encode(), digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------- the aggregates at a time

class OnlineFeatures:
    """The spec's aggregates for a stream of events, from and into an `EventState`."""

    def __init__(self, spec: DatasetSpec, state: EventState):
        self.spec = spec
        self.state = state
        self.entities = {e: spec.entities[e].key for e in catalog.served_entities(spec)}
        self.value_columns = value_columns(spec)
        self.names = [a.feature_name for a in spec.features.aggregates]
        self.reach = reach_ns(spec)
        self.delay = int(spec.label_delay.value)

    def event(self, fields: dict, event_id: str | int | None, label: float = np.nan) -> Event:
        """An event from a request's (or a raw row's) fields; an event without id gets a fresh one,
        so it is never taken for a retry."""
        keys = {}
        for entity, key in self.entities.items():
            value = fields.get(key)
            if value is None or (isinstance(value, float) and np.isnan(value)):
                raise OutsideState(f"{key}: the entity key is missing; the {entity} aggregates need it")
            keys[entity] = key_text(value)
        values = tuple(_number(fields.get(c)) for c in self.value_columns)
        return Event(str(event_id) if event_id is not None else uuid.uuid4().hex, to_ns(fields[self.spec.timestamp]),
                     keys, values, label)

    def score(self, events: list[Event]) -> tuple[dict[str, np.ndarray], list[OutsideState | None]]:
        """Every aggregate of every event as of its own time, then the events recorded: one transaction.

        Events are taken in time order, so an earlier event of the batch counts for a later one; an
        event whose id the state already holds (a retry) is scored again but not counted again.
        Returns the features (NaN where an event was refused) and, per event, why it was refused."""
        out = {name: np.full(len(events), np.nan) for name in self.names}
        refused: list[OutsideState | None] = [None] * len(events)
        order = sorted(range(len(events)), key=lambda i: events[i].ts)
        with self.state.transaction():
            wanted: dict[tuple[str, str], list[str]] = {}
            for event in events:
                for entity in self.entities:
                    wanted.setdefault((entity, event.keys[entity]), []).append(event.id)
            histories = self.state.read(wanted)
            fresh: dict[tuple[str, str], list[Event]] = {}
            for i in order:
                event = events[i]
                try:
                    row = self._row(event, histories)
                except OutsideState as exc:
                    refused[i] = exc
                    continue
                for name, value in row.items():
                    out[name][i] = value
                for entity in self.entities:
                    history = histories[(entity, event.keys[entity])]
                    if not history.holds(event.id):
                        history.add(event)
                        fresh.setdefault((entity, event.keys[entity]), []).append(event)
            self.state.write({pair: (histories[pair], events) for pair, events in fresh.items()}, self.reach)
        return out, refused

    def _row(self, event: Event, histories: dict[tuple[str, str], History]) -> dict[str, float]:
        row: dict[str, float] = {}
        for entity in self.entities:
            history = histories[(entity, event.keys[entity])]
            if len(history.ts) and event.ts < history.ts[-1] - self.reach:
                oldest = pd.Timestamp(history.ts[-1] - self.reach, tz="UTC")
                raise OutsideState(f"{self.spec.timestamp}: {pd.Timestamp(event.ts, tz='UTC').isoformat()} is older "
                                   f"than the online state keeps for {entity} {event.keys[entity]} (from "
                                   f"{oldest.isoformat()}); score it offline")
            for agg in self.spec.aggregates_by_entity[entity]:
                row[agg.feature_name] = aggregate_at(agg, event.ts, history.ts, history.labels, history.values,
                                                     self.value_columns, self.delay)
        return row

    def label(self, labels: dict[str, float]) -> int:
        """Late labels (event id -> 1.0 / 0.0) onto the events the state holds; how many it held."""
        with self.state.transaction():
            return self.state.set_labels(labels)

    def reconcile(self, rows: pd.DataFrame) -> int:
        """A batch landed: the days its rows cover (with the history read before it) are replaced by
        them, as the offline store reads the newest partition of each day; events on other days stay.
        The state replaces them a group of entity keys per transaction, so the server keeps answering
        meanwhile (a request sees its keys either before or after). Returns the events written."""
        if rows.empty:
            return 0
        when = _ns(rows[self.spec.timestamp])
        days = np.unique(when // DAY_NS).tolist()
        kept = when >= int(when.max()) - self.reach  # older events expire at once
        self.state.replace_days(days, self.event_table(rows[kept]))
        with self.state.transaction():
            self.state.expire(self.reach)
        return int(kept.sum())

    def event_table(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Raw rows as the state's rows, one per (entity, row): entity, key, id, ts, label, v0...;
        built column by column (a batch is millions of rows)."""
        if rows.empty:
            return pd.DataFrame(columns=["entity", "key", "id", "ts", "label"])
        when = _ns(rows[self.spec.timestamp])
        label = (self.spec.positive(rows[self.spec.label]).to_numpy() if self.spec.label in rows
                 else np.full(len(rows), np.nan))
        # Rows without an id (history is read without it) get one of their own: the days they cover are
        # replaced whole, so it only has to be unique.
        ids = np.array([f"row:{t}:{i}" for i, t in enumerate(when.tolist())], dtype=object)
        if self.spec.id and self.spec.id in rows:
            given = rows[self.spec.id]
            ids = np.where(given.notna().to_numpy(), given.astype(str).to_numpy(dtype=object), ids)
        values = {f"v{i}": pd.to_numeric(rows[c], errors="coerce").to_numpy(np.float64)
                  for i, c in enumerate(self.value_columns)}
        parts = [pd.DataFrame({"entity": entity, "key": [key_text(v) for v in rows[key].tolist()], "id": ids,
                               "ts": when, "label": label, **values})
                 for entity, key in self.entities.items()]
        return pd.concat(parts, ignore_index=True)


def aggregate_at(agg: Aggregate, t: int, ts: np.ndarray, labels: np.ndarray, values: np.ndarray,
                 columns: list[str], delay: int) -> float:
    """One aggregate of one entity's events (sorted by time) as of time t, by the spec's semantics:
    windows are the slice [t - w, t) of the sorted times, found by binary search."""
    before = int(np.searchsorted(ts, t, side="left"))  # events strictly earlier than t
    if agg.agg == "time_since_previous":
        return (t - int(ts[before - 1])) / 1e9 if before else np.nan
    window = _window_ns(agg.window)
    start = int(np.searchsorted(ts, t - window, side="left"))
    if agg.agg == "label_rate":
        known = labels[start:int(np.searchsorted(ts, t - delay, side="right"))]
        known = known[~np.isnan(known)]
        return float(known.mean()) if len(known) else np.nan
    if agg.agg == "count":
        return float(max(0, before - start))
    seen = values[start:before, columns.index(agg.column)]
    seen = seen[~np.isnan(seen)]
    if not len(seen) or (agg.agg == "std" and len(seen) < 2):
        return np.nan
    if agg.agg == "std":
        return float(np.std(seen, ddof=1))
    return float(getattr(np, agg.agg)(seen))


@functools.lru_cache(maxsize=64)
def _window_ns(window: str) -> int:
    return int(pd.Timedelta(window).value)


def reach_ns(spec: DatasetSpec) -> int:
    """How long an event stays in the state: the longest window (at least a day), as far as the offline
    transformation reaches back before a batch."""
    windows = [pd.Timedelta(a.window) for a in spec.features.aggregates if a.window]
    return int(max([*windows, pd.Timedelta(days=1)]).value)


def key_text(value) -> str:
    """An entity key as the state stores it: integers without a fraction, strings as they are."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value.item() if isinstance(value, np.generic) else value)


def to_ns(when) -> int:
    """Nanoseconds since the epoch; a naive time is UTC, as the offline transformation reads it."""
    return int(pd.Timestamp(when).value)


def _ns(times: pd.Series) -> np.ndarray:
    return pd.to_datetime(times, utc=True).dt.as_unit("ns").array.asi8


def _number(value) -> float:
    return np.nan if value is None else float(value)


# ---------------------------------------------------------------- state backends

class EventState(ABC):
    """Where the events live (SQLite or Redis below). `transaction` makes read-then-write one step for
    every process."""

    @abstractmethod
    def transaction(self):
        """A context manager: one atomic step for every process sharing the state."""

    @abstractmethod
    def read(self, wanted: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], History]:
        """Each (entity, key)'s events; `wanted` also names the ids the batch carries for it."""
        ...

    @abstractmethod
    def write(self, fresh: dict[tuple[str, str], tuple[History, list[Event]]], reach: int) -> None:
        """Each changed key's history (after the batch's events were added) and those new events."""
        ...

    @abstractmethod
    def set_labels(self, labels: dict[str, float]) -> int:
        """Labels (event id -> 1.0 / 0.0) onto the held events; how many (entity, event) rows took one."""

    @abstractmethod
    def replace_days(self, days: list[int], table: pd.DataFrame) -> None:
        """Delete every event of `days` (UTC day numbers), then add `table` (`OnlineFeatures.event_table`);
        in transactions of its own."""
        ...

    @abstractmethod
    def expire(self, reach: int) -> None:
        """Drop events older than `reach` behind the newest one."""
        ...

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Events (per entity) and entity keys held."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads."""


class SqliteEventState(EventState):
    """One SQLite file in WAL mode: readers never wait, and a micro-batch's read-then-write is one
    IMMEDIATE transaction, so concurrent server processes never count an event twice or miss one another's.

    One row per entity key holds its events as arrays (times, id hashes, then label and values): a request
    reads one row per entity and writes it back, whatever the number of events (a row per event cost a
    fetch per event: 0.6 ms per request at 66 events per key). A rowid table, so a key's row of a few
    kilobytes sits in its page rather than in overflow pages. `event_ids` finds the keys of an event id
    (late labels) and the keys with events on a day (a batch that replaces it)."""

    LAYOUT = 3

    def __init__(self, path: Path, width: int, busy_timeout_s: float = 5.0, background_checkpoints: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.width = width
        self._checkpoints: _Checkpointer | None = None
        self._depth = 0
        self._lock = threading.RLock()  # one connection, used by the event loop and a model thread alike
        self.db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # Reads through a memory map and a page cache the size of a demo's state: a request's key rows
        # span overflow pages, read with a system call each otherwise.
        self.db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        if background_checkpoints:
            # A checkpoint copies the WAL into the file and syncs it: tens of ms on the request that
            # triggers it (p99 34 ms in batches of 16, from 2.9 ms at p50). A thread does it instead.
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpoints = _Checkpointer(path, busy_timeout_s)
        else:
            self.db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        with self.transaction():
            self.db.execute("CREATE TABLE IF NOT EXISTS layout (version INTEGER, width INTEGER)")
            if self.db.execute("SELECT version, width FROM layout").fetchall() != [(self.LAYOUT, width)]:
                # A new layout, or the spec's aggregated columns changed: start over (the next batch refills it).
                for table in ("events", "entity_keys", "event_ids", "layout"):
                    self.db.execute(f"DROP TABLE IF EXISTS {table}")
                self.db.execute("CREATE TABLE layout (version INTEGER, width INTEGER)")
                self.db.execute("INSERT INTO layout VALUES (?, ?)", (self.LAYOUT, width))
            self.db.execute("CREATE TABLE IF NOT EXISTS entity_keys (entity TEXT NOT NULL, key TEXT NOT NULL, "
                            "ts BLOB NOT NULL, ids BLOB NOT NULL, floats BLOB NOT NULL, UNIQUE (entity, key))")
            self.db.execute("CREATE TABLE IF NOT EXISTS event_ids (id TEXT NOT NULL, entity TEXT NOT NULL, "
                            "key TEXT NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY (id, entity)) WITHOUT ROWID")
            self.db.execute("CREATE INDEX IF NOT EXISTS event_ids_by_time ON event_ids (ts)")

    def transaction(self):
        return _Transaction(self)

    def _load(self, entity: str, key: str) -> History:
        row = self.db.execute("SELECT ts, ids, floats FROM entity_keys WHERE entity = ? AND key = ?",
                              (entity, key)).fetchone()
        if row is None:
            return History.empty(self.width)
        floats = np.frombuffer(row[2], np.float64).reshape(-1, 1 + self.width)
        return History(np.frombuffer(row[0], np.int64), np.frombuffer(row[1], np.int64), floats[:, 0], floats[:, 1:])

    def _store(self, entity: str, key: str, history: History) -> None:
        if not len(history.ts):
            self.db.execute("DELETE FROM entity_keys WHERE entity = ? AND key = ?", (entity, key))
            return
        floats = np.column_stack([history.labels, history.values]).astype(np.float64)
        self.db.execute("INSERT INTO entity_keys VALUES (?, ?, ?, ?, ?) ON CONFLICT (entity, key) DO UPDATE "
                        "SET ts = excluded.ts, ids = excluded.ids, floats = excluded.floats",
                        (entity, key, history.ts.astype(np.int64).tobytes(), history.ids.astype(np.int64).tobytes(),
                         floats.tobytes()))

    def read(self, wanted):
        return {pair: self._load(*pair) for pair in wanted}

    def write(self, fresh, reach):
        for (entity, key), (history, events) in fresh.items():
            start = int(np.searchsorted(history.ts, max(e.ts for e in events) - reach, side="left"))
            self._store(entity, key, history.keep(slice(start, None)) if start else history)
        self.db.executemany("INSERT OR IGNORE INTO event_ids VALUES (?, ?, ?, ?)",
                            [(e.id, entity, key, e.ts) for (entity, key), (_, events) in fresh.items() for e in events])

    def set_labels(self, labels):
        found = 0
        for event_id, value in labels.items():
            for entity, key in self.db.execute("SELECT entity, key FROM event_ids WHERE id = ?",
                                               (str(event_id),)).fetchall():
                history = self._load(entity, key)
                at = history.ids == id_hash(event_id)
                if at.any():
                    history.labels = history.labels.copy()
                    history.labels[at] = float(value)
                    self._store(entity, key, history)
                    found += 1
        return found

    def replace_days(self, days, table):
        covered = np.asarray(days, np.int64)
        touched: set[tuple[str, str]] = set()
        for day in days:
            touched |= set(self.db.execute("SELECT DISTINCT entity, key FROM event_ids WHERE ts >= ? AND ts < ?",
                                           (day * DAY_NS, (day + 1) * DAY_NS)).fetchall())
        groups = table.groupby(["entity", "key"], sort=False).indices if len(table) else {}
        ts = table["ts"].to_numpy(np.int64) if len(table) else np.empty(0, np.int64)
        floats = (table[["label", *(f"v{i}" for i in range(self.width))]].to_numpy(np.float64) if len(table)
                  else np.empty((0, 1 + self.width)))
        ids = table["id"].tolist() if len(table) else []
        hashes = np.array([id_hash(i) for i in ids], np.int64)
        pairs = list(touched | set(groups))
        for start in range(0, len(pairs), RECONCILE_KEYS):
            with self.transaction():
                for entity, key in pairs[start:start + RECONCILE_KEYS]:
                    history = self._load(entity, key)
                    history = history.keep(~np.isin(history.ts // DAY_NS, covered))
                    rows = groups.get((entity, key))
                    if rows is not None:
                        history = _merged(history, ts[rows], hashes[rows], floats[rows])
                    self._store(entity, key, history)
        with self.transaction():
            for day in days:
                self.db.execute("DELETE FROM event_ids WHERE ts >= ? AND ts < ?", (day * DAY_NS, (day + 1) * DAY_NS))
            self.db.executemany("INSERT OR REPLACE INTO event_ids VALUES (?, ?, ?, ?)",
                                zip(ids, table["entity"].tolist() if len(table) else [],
                                    table["key"].tolist() if len(table) else [], ts.tolist(), strict=True))

    def expire(self, reach):
        newest = self.db.execute("SELECT max(ts) FROM event_ids").fetchone()[0]
        if newest is None:
            return
        horizon = newest - reach
        for entity, key in self.db.execute("SELECT DISTINCT entity, key FROM event_ids WHERE ts < ?",
                                           (horizon,)).fetchall():
            history = self._load(entity, key)
            self._store(entity, key, history.keep(history.ts >= horizon))
        self.db.execute("DELETE FROM event_ids WHERE ts < ?", (horizon,))

    def stats(self):
        events = self.db.execute("SELECT count(*) FROM event_ids").fetchone()[0]
        keys = self.db.execute("SELECT count(*) FROM entity_keys").fetchone()[0]
        return {"events": events, "entity_keys": keys}

    def close(self):
        if self._checkpoints is not None:
            self._checkpoints.stop()
        self.db.close()


class _Checkpointer:
    """PASSIVE checkpoints of a WAL database every `interval` seconds, on a connection and thread of its
    own: they never block a reader or a writer (any process's), and a request never pays for one."""

    def __init__(self, path: Path, busy_timeout_s: float, interval: float = CHECKPOINT_SECONDS):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, busy_timeout_s, interval), daemon=True,
                                        name="online-state-checkpoints")
        self._thread.start()

    def _run(self, path: Path, busy_timeout_s: float, interval: float) -> None:
        db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            while not self._stop.wait(interval):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:  # busy or gone: the next turn tries again
                    continue
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); nested uses join the outer one."""

    def __init__(self, state: SqliteEventState):
        self.state = state

    def __enter__(self):
        self.state._lock.acquire()
        if self.state._depth == 0:
            self.state.db.execute("BEGIN IMMEDIATE")
        self.state._depth += 1

    def __exit__(self, kind, exc, tb):
        try:
            self.state._depth -= 1
            if self.state._depth == 0:
                self.state.db.execute("ROLLBACK" if kind else "COMMIT")
        finally:
            self.state._lock.release()


def _merged(history: History, ts: np.ndarray, ids: np.ndarray, floats: np.ndarray) -> History:
    """A key's history with more events, in time order (ties: the history's first)."""
    all_ts = np.concatenate([history.ts, ts])
    order = np.argsort(all_ts, kind="stable")
    both = np.concatenate([np.column_stack([history.labels, history.values]), floats])[order]
    return History(all_ts[order], np.concatenate([history.ids, ids])[order], both[:, 0], both[:, 1:])


def _sql(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


class RedisEventState(EventState):
    """Each entity key's events in a sorted set (score: microseconds) beside a hash of its ids, and per
    event id a hash of the sets holding it (for late labels). A script adds an event only if its id is
    new and trims the set past the longest window, atomically. A micro-batch reads its entities in one
    round trip and writes in one; two replicas scoring the same entity at the same instant may not see
    each other's event (docs/serving.md)."""

    # KEYS: the set, its ids, the event's pointer hash. ARGV: id, score, member, trim below, ttl ms, entity.
    ADD = """
local added = 0
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3]); added = 1
end
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
for _, member in ipairs(old) do redis.call('HDEL', KEYS[2], cjson.decode(member)[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
redis.call('HSET', KEYS[3], ARGV[6], KEYS[1])
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[5]) end
return added
"""
    # KEYS: the set, its ids. ARGV: id, label.
    LABEL = """
local member = redis.call('HGET', KEYS[2], ARGV[1])
if not member then return 0 end
local event = cjson.decode(member)
event[3] = tonumber(ARGV[2])
local updated = cjson.encode(event)
redis.call('ZREM', KEYS[1], member)
redis.call('ZADD', KEYS[1], math.floor(event[2] / 1000), updated)
redis.call('HSET', KEYS[2], ARGV[1], updated)
return 1
"""

    def __init__(self, client, prefix: str, width: int, reach: int):
        self.redis = client
        self.prefix = prefix
        self.width = width
        self.reach = reach  # how long a key lives past its last add (ms in PEXPIRE)
        self._add = client.register_script(self.ADD)
        self._label = client.register_script(self.LABEL)

    def _set(self, entity: str, key: str) -> str:
        return f"{self.prefix}:set:{entity}:{key}"

    def transaction(self):
        return _NoTransaction()

    def read(self, wanted):
        pairs = list(wanted)
        pipe = self.redis.pipeline(transaction=False)
        for entity, key in pairs:
            pipe.zrange(self._set(entity, key), 0, -1)
            pipe.hmget(self._set(entity, key) + ":ids", wanted[(entity, key)])
        answers = pipe.execute()
        out = {}
        for n, pair in enumerate(pairs):
            members, held = answers[2 * n], answers[2 * n + 1]
            events = sorted((json.loads(m) for m in members), key=lambda e: e[1])  # [id, ts, label, values]
            ts = np.array([e[1] for e in events], dtype=np.int64)
            floats = np.array([e[2:] for e in events], dtype=np.float64).reshape(len(events), 1 + self.width)
            history = History(ts, np.array([id_hash(e[0]) for e in events], np.int64), floats[:, 0], floats[:, 1:])
            history.held |= {id_hash(i) for i, h in zip(wanted[pair], held, strict=True) if h is not None}
            out[pair] = history
        return out

    def write(self, fresh, reach):
        pipe = self.redis.pipeline(transaction=False)
        for (entity, key), (_, events) in fresh.items():
            newest = max(e.ts for e in events)
            for e in events:
                self._add_event(pipe, entity, key, e.id, e.ts, e.label, e.values, newest - reach, reach)
        pipe.execute()

    def _add_event(self, pipe, entity, key, event_id, ts, label, values, trim_below, reach) -> None:
        zset = self._set(entity, key)
        member = json.dumps([event_id, int(ts), _sql(label), *map(_sql, values)])
        self._add(keys=[zset, zset + ":ids", f"{self.prefix}:id:{event_id}"],
                  args=[event_id, int(ts) // 1000, member, trim_below // 1000, max(1, reach // 10**6), entity],
                  client=pipe)

    def set_labels(self, labels):
        ids = [str(k) for k in labels]
        pipe = self.redis.pipeline(transaction=False)
        for event_id in ids:
            pipe.hgetall(f"{self.prefix}:id:{event_id}")
        found = 0
        for event_id, sets in zip(ids, pipe.execute(), strict=True):
            for zset in sets.values():
                zset = zset.decode() if isinstance(zset, bytes) else zset
                found += int(self._label(keys=[zset, zset + ":ids"], args=[event_id, float(labels[event_id])]))
        return found

    def replace_days(self, days, table):
        for day in days:
            low, high = day * DAY_NS, (day + 1) * DAY_NS
            self._replace_day(day, table[(table["ts"] >= low) & (table["ts"] < high)] if len(table) else table)

    def _replace_day(self, day, table):
        sets = [n.decode() if isinstance(n, bytes) else n
                for n in self.redis.scan_iter(match=f"{self.prefix}:set:*", count=1000)]
        sets = [n for n in sets if not n.endswith(":ids")]
        low, high = day * DAY_NS // 1000, "(" + str((day + 1) * DAY_NS // 1000)
        pipe = self.redis.pipeline(transaction=False)
        for name in sets:
            pipe.zrangebyscore(name, low, high)
        found = pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for name, members in zip(sets, found, strict=True):
            for member in members:
                pipe.hdel(name + ":ids", json.loads(member)[0])
            pipe.zremrangebyscore(name, low, high)
        pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        values = [f"v{i}" for i in range(self.width)]
        for row in table.itertuples(index=False):
            # Trimmed later by each set's own newest event; the keys' expiry is the longest window.
            self._add_event(pipe, row.entity, row.key, row.id, row.ts, row.label,
                            tuple(getattr(row, v) for v in values), 0, self.reach)
            if len(pipe) >= 10_000:
                pipe.execute()
        pipe.execute()

    def expire(self, reach):
        """Each key expires on its own (PEXPIRE at every add): nothing to sweep."""

    def close(self):
        self.redis.close()

    def stats(self):
        sets = [n for n in self.redis.scan_iter(match=f"{self.prefix}:set:*", count=1000)
                if not (n.decode() if isinstance(n, bytes) else n).endswith(":ids")]
        return {"events": sum(self.redis.zcard(n) for n in sets), "entity_keys": len(sets)}


class _NoTransaction:
    """Redis needs none: each event's add is one script, atomic on the server."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def open_state(settings, spec: DatasetSpec, serving: bool = False) -> EventState:
    """The table's online state: Redis when `feast_redis` is set, else SQLite under its home (`serving`:
    its checkpoints in a thread, off the requests' path)."""
    width = len(value_columns(spec))
    if settings.feast_redis:
        return RedisEventState(redis_client(settings.feast_redis), f"sluicegate:{spec.name}:events:{state_key(spec)}",
                               width, reach_ns(spec))
    return SqliteEventState(state_path(settings, spec), width, background_checkpoints=serving)


def value_columns(spec: DatasetSpec) -> list[str]:
    """The columns the state keeps with each event: those some aggregate reads."""
    return sorted({a.column for a in spec.features.aggregates if a.column})


def state_key(spec: DatasetSpec) -> str:
    """Names the state by the columns it keeps, so a server on one champion and a run (or a champion)
    on a spec that aggregates other columns never share, and so never reset, one state."""
    return hashlib.blake2b("\x1f".join(value_columns(spec)).encode(), digest_size=4).hexdigest()


def state_path(settings, spec: DatasetSpec) -> Path:
    return settings.paths.feast / f"online_events-{state_key(spec)}.db"


def redis_client(connection: str):
    """A client from Feast's Redis connection string (`host:port,password=...,ssl=true`)."""
    import redis

    address, *options = connection.split(",")
    host, _, port = address.partition(":")
    kwargs = dict(option.split("=", 1) for option in options)
    return redis.Redis(host=host, port=int(port or 6379), password=kwargs.get("password"),
                       ssl=kwargs.get("ssl", "false").lower() == "true", db=int(kwargs.get("db", 0)),
                       socket_timeout=5, socket_connect_timeout=5)


# ---------------------------------------------------------------- a window replayed as served

def replay(spec: DatasetSpec, prior: pd.DataFrame, rows: pd.DataFrame, state: EventState) -> pd.DataFrame:
    """`rows` scored through the serving path, in time order and in micro-batches, on a state that holds
    `prior` (the events before them, labels included); each batch's labels reach the state after it
    is scored, as late labels do, and a batch never spans more than the label delay (so no label that
    is known by an event's time is still missing). Returns each row's aggregates (rows' order)."""
    online = OnlineFeatures(spec, state)
    online.reconcile(prior)
    ordered = rows.assign(__row=np.arange(len(rows))).sort_values(spec.timestamp, kind="stable")
    fields = ordered.to_dict("records")
    labels = spec.positive(ordered[spec.label]).to_numpy() if spec.label in ordered else None
    found = {name: np.full(len(rows), np.nan) for name in online.names}
    for part in _micro_batches(_ns(ordered[spec.timestamp]), online.delay):
        batch = [fields[i] for i in part]
        events = [online.event(f, f.get(spec.id) if spec.id else f"replay:{f['__row']}") for f in batch]
        values, _ = online.score(events)
        where = [f["__row"] for f in batch]
        for name in online.names:
            found[name][where] = values[name]
        if labels is not None:
            online.label({e.id: float(labels[i]) for e, i in zip(events, part, strict=True)})
    return pd.DataFrame(found, index=rows.index)


def _micro_batches(times: np.ndarray, delay: int) -> list[range]:
    """Consecutive runs of at most REPLAY_BATCH events, each spanning less than `delay`."""
    out, start = [], 0
    for i in range(1, len(times) + 1):
        if i == len(times) or i - start == REPLAY_BATCH or (delay and times[i] - times[start] >= delay):
            out.append(range(start, i))
            start = i
    return out


def label_events(settings, spec: DatasetSpec, labels: pd.DataFrame) -> int:
    """Late labels (the spec's id and label columns) onto the events the online state holds, so label
    rates count them once their events are `label_delay` old; how many (entity, event) rows took one."""
    if not any(a.agg == "label_rate" for a in spec.features.aggregates) or labels.empty:
        return 0
    state = open_state(settings, spec)
    try:
        values = spec.positive(labels[spec.label]).to_numpy()
        return OnlineFeatures(spec, state).label(dict(zip(labels[spec.id].astype(str), values.tolist(), strict=True)))
    finally:
        state.close()
