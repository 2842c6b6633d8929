"""The PostgreSQL engine's leases: ``leases`` (one row per name) and ``lease_terms`` (one row
per term held), terms from ``term_seq``, expiry stamped and compared in SQL with
``coord_now()`` (the server's clock), held back after a step of that clock
(``LEASE_EXPIRY``, see ``.clock``): a takeover's verdict is made on readings that would
find the step, and a renewal's reading is one, so a live holder keeps its lease.

Taking locks, in the engine's order (instances before leases): the taker's own instance row
``FOR SHARE`` (it cannot be buried while it takes), the holder's row ``FOR UPDATE`` (its
death rule, applied after the takeover's commit by the new holder or else by a reaper,
queues behind), then the lease row ``FOR UPDATE``. A fenced
operation holds the lease row ``FOR SHARE`` while its writes run, so no take, renewal or
release of that lease commits in between: the term it checked is the term it wrote under.
Making a lease free is written once, in ``lease_rows``.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from psycopg import errors as pgerrors
from psycopg.types.numeric import Int8

from ...clock import boot_id
from ...errors import LeaseLost, NotRegistered
from ..records import LeaseRecord, LeaseTaken, Member, Seen
from .armed import ArmedTakeover, Spares, positional, slice_for
from .clock import LEASE_EXPIRY
from .connection import Conn, fetch, scalar, translated
from .events import log_event
from .lease_rows import expire_lapsed, free_held, free_term
from .queue_rows import into_queue, put_in

if TYPE_CHECKING:
    from ..queue_ops import NewJobRow
    from .clock import ServerClock
    from .connection import PgDb, Row
    from .kv import PgKv
    from .liveness import PgLiveness

#: Statements of a fenced write: (SQL with %s placeholders, parameters).
Statements = Sequence[tuple[str, "tuple[Any, ...] | dict[str, Any]"]]

#: A lease row with the server's clock read in the same statement, and when it expires.
_SELECT = f"SELECT *, coord_now() AS now_mono, {LEASE_EXPIRY} AS until_mono FROM leases"  # noqa: S608

_CURRENT = ("SELECT 1 FROM leases WHERE name = %s AND term = %s AND holder_id IS NOT NULL "  # noqa: S608 - fixed fragments
            f"AND {LEASE_EXPIRY} >= coord_now() FOR SHARE")
_CURRENT_FOR_UPDATE = _CURRENT.replace("FOR SHARE", "FOR UPDATE")

_TAKE = (
    "WITH l AS (INSERT INTO leases (name, holder_id, holder_incarnation, term, ttl, "
    "acquired_at, renewed_at, expires_mono) VALUES (%s, %s, %s, nextval('term_seq'), %s, "
    "coord_now(), coord_now(), coord_now() + %s) ON CONFLICT (name) DO UPDATE SET "
    "holder_id = excluded.holder_id, holder_incarnation = excluded.holder_incarnation, "
    "term = excluded.term, ttl = excluded.ttl, acquired_at = excluded.acquired_at, "
    "renewed_at = excluded.renewed_at, expires_mono = excluded.expires_mono "
    "RETURNING name, term, holder_id, holder_incarnation) "
    "INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
    "SELECT name, term, holder_id, holder_incarnation, coord_now() FROM l RETURNING term"
)

# A renewal, and a reading of the server's clock taken after its verdict.
_RENEW = (
    "WITH r AS (UPDATE leases SET renewed_at = coord_now(), expires_mono = coord_now() + %s "  # noqa: S608 - fixed fragments
    "WHERE name = %s AND term = %s AND holder_id = %s AND holder_incarnation = %s "
    f"AND {LEASE_EXPIRY} >= coord_now() RETURNING 1) "
    "SELECT EXISTS (SELECT 1 FROM r) AS ok, coord_now() AS now_mono"
)


#: Verdicts that are a death certificate of this host (the pid and its start token, the lock
#: file, or a boot that is over): the holder can never come back, whatever time it is.
_CERTIFIED = frozenset({"died", "reboot"})

#: A taker's unlocked look: the lease's holder and term, that holder's instance row, the
#: taker's own status and the server's clock (and the step it holds, see ``.clock``).
_PEEK = (
    "SELECT l.term AS l_term, l.holder_id AS l_holder_id, "  # noqa: S608 - fixed fragments
    "l.holder_incarnation AS l_holder_incarnation, l.until_mono, "
    "n.t AS now_mono, (SELECT held_since FROM server_epoch) AS held_since, "
    "(SELECT status FROM instances WHERE id = %(id)s AND incarnation = %(inc)s) AS me_status, "
    "i.* FROM (SELECT coord_now() AS t) n "
    f"LEFT JOIN (SELECT *, {LEASE_EXPIRY} AS until_mono FROM leases) l "
    "ON l.name = %(name)s AND l.holder_id IS NOT NULL "
    "LEFT JOIN instances i ON i.id = l.holder_id AND i.incarnation = l.holder_incarnation"
)

#: The takeover from a holder with a death certificate, in one statement: the taker's row
#: FOR SHARE, the holder's row FOR UPDATE, then the lease row FOR UPDATE (the engine's
#: order: instances before leases; each a MATERIALIZED step the next one needs), each only
#: as judged; then the old term's history closed, the next term taken with its history row,
#: and the two events ('lease released', 'leader changed') as a takeover writes them.
_TAKE_CERTIFIED = (
    "WITH me AS MATERIALIZED (SELECT 1 FROM instances WHERE id = %(id)s "
    " AND incarnation = %(inc)s AND status = 'alive' FOR SHARE), "
    "h AS MATERIALIZED (SELECT 1 FROM instances WHERE id = %(hid)s AND incarnation = %(hinc)s "
    " AND status = 'alive' AND pid = %(pid)s AND start_token = %(token)s "
    " AND boot_id = %(boot)s AND lock_path = %(lock)s AND EXISTS (SELECT 1 FROM me) "
    " FOR UPDATE), "
    "old AS MATERIALIZED (SELECT name, term FROM leases WHERE name = %(name)s "
    " AND term = %(term)s AND holder_id = %(hid)s AND holder_incarnation = %(hinc)s "
    " AND EXISTS (SELECT 1 FROM h) FOR UPDATE), "
    "ended AS (UPDATE lease_terms t SET released_at = coord_now(), reason = %(reason)s "
    " FROM old WHERE t.name = old.name AND t.term = old.term), "
    "l AS (UPDATE leases x SET holder_id = %(id)s, holder_incarnation = %(inc)s, "
    " term = nextval('term_seq'), ttl = %(ttl)s, acquired_at = coord_now(), "
    " renewed_at = coord_now(), expires_mono = coord_now() + %(ttl)s "
    " FROM old WHERE x.name = old.name "
    " RETURNING x.name, x.term, x.pgid, x.pg_start_token, x.pg_holder_id, "
    " x.pg_holder_incarnation), "
    "hist AS (INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, "
    " acquired_at) SELECT name, term, %(id)s, %(inc)s, coord_now() FROM l), "
    "ev AS (INSERT INTO events (at, kind, instance_id, subject, detail) "
    " SELECT coord_now(), 'lease released', %(hid)s, name, %(released)s FROM l "
    " UNION ALL SELECT coord_now(), 'leader changed', %(id)s, name, "
    " %(changed)s || term || '}' FROM l) "
    "SELECT l.*, (SELECT boot_id FROM instances WHERE id = l.pg_holder_id "
    " AND incarnation = l.pg_holder_incarnation) AS pg_boot FROM l"
)


#: How many runs of a prepared statement PostgreSQL plans with its parameters before it
#: considers its generic plan (plancache.c).
_CUSTOM_PLANS = 6
#: The connections on which the certified takeover is prepared (``PgLeases._prime``).
_PRIMED: weakref.WeakSet[Conn] = weakref.WeakSet()


def _certified(me: Member, name: str, ttl: float, old: int, holder: tuple[str, int, int, int],
               boot: str, lock: str, verdict: str) -> dict[str, Any]:
    """``_TAKE_CERTIFIED``'s parameters, for taking ``name`` in the term after ``old`` from
    ``holder`` (id, incarnation, pid, start token): its integers always bound as bigint,
    so that the statement prepared once (``PgLeases._prime``) is the one executed."""
    hid, hinc, pid, token = holder
    return {
        "name": name, "id": me[0], "inc": Int8(me[1]), "ttl": float(ttl), "term": Int8(old),
        "hid": hid, "hinc": Int8(hinc), "pid": Int8(pid), "token": Int8(token),
        "boot": boot, "lock": lock, "reason": verdict,
        "released": json.dumps({"reason": verdict, "term": old}, sort_keys=True),
        # The new term ends the detail (json.dumps's own form, keys sorted).
        "changed": json.dumps({"previous": hid, "reason": verdict}, sort_keys=True)[:-1]
        + ', "term": ',
    }


def _member(id: Any, incarnation: Any) -> Member | None:
    return None if id is None else (str(id), int(incarnation))


def _record(row: Row) -> LeaseRecord:
    held = row["holder_id"] is not None
    return LeaseRecord(
        name=row["name"], holder=_member(row["holder_id"], row["holder_incarnation"]),
        term=int(row["term"]), ttl=row["ttl"], acquired_at=row["acquired_at"],
        renewed_at=row["renewed_at"],
        expires_in=(row["until_mono"] - row["now_mono"])
        if held and row["until_mono"] is not None else None,
        pgid=row["pgid"], pg_start_token=row["pg_start_token"],
        pg_holder=_member(row["pg_holder_id"], row["pg_holder_incarnation"]),
    )


def _taken(got: Mapping[str, Any], dead: tuple[str, int, str]) -> LeaseTaken:
    """What the certified takeover's row says was taken from the holder ``dead`` (id,
    incarnation, verdict); its values as the driver reads them or as text."""
    def number(k: str) -> int | None:
        return None if got[k] is None else int(got[k])

    group = None
    pgid, token = number("pgid"), number("pg_start_token")
    if pgid is not None and token is not None and (
            got["pg_holder_id"] is None or got["pg_boot"] in (None, boot_id())):
        group = (pgid, token)
    tree = None if got["pg_holder_id"] is None else (str(got["pg_holder_id"]),
                                                     int(got["pg_holder_incarnation"]))
    term = number("term")
    assert term is not None
    return LeaseTaken(term, dead[0], group, tree, dead)


def _expired(row: Row) -> bool:
    """Whether a lease row read with ``_SELECT`` was past its expiry at that reading."""
    return row["until_mono"] is None or row["until_mono"] < row["now_mono"]


class PgLeases:
    """``coord.backend.LeaseOps``."""

    def __init__(self, db: PgDb, clock: ServerClock, liveness: PgLiveness, kv: PgKv) -> None:
        self._db = db
        self._spares = Spares(db, positional(_TAKE_CERTIFIED, _certified(
            ("", 0), "", 1.0, 0, ("", 0, 0, 0), "", "", "")))
        self._clock = clock
        self._liveness = liveness
        self._kv = kv

    # -- reads --------------------------------------------------------------------------------

    def get(self, name: str) -> LeaseRecord | None:
        # Observed: a waiting candidate's look can be the reading that finds a step.
        rows = self._clock.rows(f"{_SELECT} WHERE name = %s", (name,))
        return _record(rows[0]) if rows else None

    def every(self, *, held_only: bool = False) -> list[LeaseRecord]:
        where = " WHERE holder_id IS NOT NULL" if held_only else ""
        return [_record(r) for r in self._db.rows(
            f'{_SELECT}{where} ORDER BY name COLLATE "C"')]

    def recorded_groups(self, owner: Member | None = None) -> list[LeaseRecord]:
        sql = f"{_SELECT} WHERE pgid IS NOT NULL AND pg_holder_id IS NOT NULL"
        params: tuple[Any, ...] = ()
        if owner is not None:
            sql += " AND pg_holder_id = %s AND pg_holder_incarnation = %s"
            params = owner
        return [_record(r) for r in self._db.rows(sql + ' ORDER BY name COLLATE "C"', params)]

    def terms_of(self, holder: Member) -> tuple[int, ...]:
        return tuple(int(r["term"]) for r in self._db.rows(
            "SELECT term FROM lease_terms WHERE holder_id = %s AND holder_incarnation = %s "
            "ORDER BY term", holder))

    # -- the rules ----------------------------------------------------------------------------

    def take(self, me: Member, name: str, ttl: float, seen: Seen | None = None
             ) -> LeaseTaken | str:
        """Take ``name`` if it is free, expired, or its holder is dead; else the holder's id
        (``me``'s own when it holds it: leases are not re-entrant). ``NotRegistered`` when
        ``me`` is not a live incarnation.

        A holder proven dead is not buried here: it is named in the result (``dead``) and
        the caller applies the death rule after the commit, as on SQLite (until then it
        holds nothing that matters: every reader and taker judges it dead). First an
        unlocked read: a lease held by a live holder is answered without a transaction,
        and a holder proven dead on this host (a death certificate: pid and start token,
        or its lock file) is taken over in one statement that re-checks, under row locks,
        that the lease and the holder's row are still the ones judged. Anything else takes
        the general, row-locked transaction. ``seen`` (a waiter's last look at the holder)
        is judged first: a death certificate there saves the look."""
        if seen is not None and seen[1]["status"] == "alive":
            verdict = self._liveness.certificate(seen[1])
            if verdict is not None:
                taken = self._take_certified(me, name, ttl, seen[0], seen[1], verdict)
                if taken is not None:
                    return taken
        # Observed (a waiting candidate's look may be the reading that finds a step); a verdict
        # of expiry made on it is made again, under locks and checked, by the general path.
        [look] = self._clock.rows(_PEEK, {"name": name, "id": me[0], "inc": me[1]})
        if look["me_status"] != "alive":
            raise NotRegistered(me[0], "closed, declared dead or taken over")
        holder = _member(look["l_holder_id"], look["l_holder_incarnation"])
        if holder is not None:
            expired = _expired(look)
            if holder == (me[0], int(me[1])):
                if not expired:
                    return me[0]
            else:
                probe = self._liveness.look_at(look["now_mono"], look["held_since"])
                alive, verdict = (self._liveness.judge(look, probe) if look["id"] is not None
                                  else (False, "gone"))
                if alive and not expired:
                    self._prime()
                    return holder[0]
                if not alive and verdict in _CERTIFIED and look["status"] == "alive" \
                        and look["boot_id"] == probe.boot_id:
                    taken = self._take_certified(me, name, ttl, int(look["l_term"]), look,
                                                 verdict)
                    if taken is not None:
                        return taken
        return self._db.write(lambda c: self._take_locked(c, me, name, ttl))

    def _take_certified(self, me: Member, name: str, ttl: float, old: int, hrow: Row,
                        verdict: str) -> LeaseTaken | None:
        """The takeover of term ``old`` from a holder (its instance row ``hrow``) that a
        death certificate of this host proved dead: one statement (its own transaction)
        that locks the taker's row ``FOR SHARE``, the holder's ``FOR UPDATE`` and the lease
        row ``FOR UPDATE``, in that order, and takes the lease in the next term only while
        all three are as judged. None when anything changed since (the general path then
        decides)."""
        holder, hinc = str(hrow["id"]), int(hrow["incarnation"])
        got = self._db.row(_TAKE_CERTIFIED, _certified(
            me, name, ttl, old, (holder, hinc, hrow["pid"], hrow["start_token"]),
            hrow["boot_id"], hrow["lock_path"], verdict))
        return None if got is None else _taken(got, (holder, hinc, verdict))

    def arm(self, me: Member, name: str, ttl: float, seen: Seen
            ) -> ArmedTakeover[LeaseTaken] | None:
        """The certified takeover of the term ``seen``, sent ahead to run on the server the
        moment the holder's liveness session ends, committed only on this host's proof
        (``.armed``); None for a holder this host cannot prove dead."""
        term, hrow = seen
        if hrow.get("status") != "alive" or hrow.get("boot_id") != boot_id() \
                or not hrow.get("lock_path"):
            return None
        dead = (str(hrow["id"]), int(hrow["incarnation"]), "died")  # by its lock file
        params = _certified(me, name, ttl, term, (dead[0], dead[1], hrow["pid"],
                            hrow["start_token"]), hrow["boot_id"], hrow["lock_path"], dead[2])
        return ArmedTakeover(self._spares, hrow["lock_path"],
                             positional(_TAKE_CERTIFIED, params)[1],
                             lambda row: _taken(row, dead), self._clock.mono, slice_for(ttl))

    def _prime(self) -> None:
        """Prepare the certified takeover on this thread's connection, once: a candidate
        refused by a live holder usually waits to take over, and a takeover that is not
        planned then (its tables' catalog entries loaded into a new session, its plan made)
        takes over sooner. The statement matches no row here: it locks and writes nothing."""
        c = self._db.conn()
        if c in _PRIMED:
            return
        none = _certified(("", 0), "", 1.0, 0, ("", 0, 0, 0), "", "", "")
        with translated(self._db.where):
            # The server plans a prepared statement afresh at each of its first five runs
            # (then keeps a generic plan): those runs are here, not on the takeover's path.
            for _ in range(_CUSTOM_PLANS):
                c.execute(_TAKE_CERTIFIED, none, prepare=True).fetchall()
        _PRIMED.add(c)

    def _take_locked(self, c: Conn, me: Member, name: str, ttl: float) -> LeaseTaken | str:
        """The general takeover, in the caller's transaction, every row it judges locked."""
        if not fetch(c, "SELECT 1 FROM instances WHERE id = %s AND incarnation = %s "
                     "AND status = 'alive' FOR SHARE", me):
            raise NotRegistered(me[0], "closed, declared dead or taken over")
        row, hrow = self._locked(c, name, me)
        previous = dead = None
        reason = "free"
        if row is not None and row["holder_id"] is not None:
            previous = str(row["holder_id"])
            holder = (previous, int(row["holder_incarnation"]))
            expired = _expired(row)
            if holder == (me[0], int(me[1])) and not expired:
                return me[0]
            alive, verdict = self._liveness.judge(hrow) if hrow else (False, "gone")
            if hrow is not None and hrow["status"] == "alive" and not alive:
                # Proof of death (or a hung heartbeat): the lease is taken now; the rest of
                # the death rule follows in its own transaction (the caller's).
                dead = (holder[0], holder[1], verdict)
                reason = verdict
            elif expired:
                reason = "expired"
            elif not alive:
                reason = verdict
            else:
                return previous
            free_term(c, name, int(row["term"]), reason)
        # The new term, the lease row and its history row in one statement (one round
        # trip on the takeover's path). pgid/pg_start_token stay: the new holder ends
        # that group before anything.
        term = int(scalar(c, _TAKE, (name, *me, ttl, ttl)))
        log_event(c, "leader changed", me[0], name, term=term, previous=previous,
                  reason=reason)
        group = tree = None
        if (row is not None and row["pgid"] is not None and row["pg_start_token"] is not None
                and self._recorded_here(c, row)):
            group = (int(row["pgid"]), int(row["pg_start_token"]))
        if row is not None:
            tree = _member(row["pg_holder_id"], row["pg_holder_incarnation"])
        return LeaseTaken(term, previous, group, tree, dead)

    @staticmethod
    def _recorded_here(c: Conn, row: Row) -> bool:
        """Whether the lease's recorded process group is of this machine and boot: a group
        of another host's holder names nothing here (or a stranger with the same pgid), so
        the new holder must not signal it — fencing is what refuses that holder then."""
        if row["pg_holder_id"] is None:
            return True  # recorded without an owner: by a process of this boot (SQLite too)
        found = fetch(c, "SELECT boot_id FROM instances WHERE id = %s AND incarnation = %s",
                      (row["pg_holder_id"], row["pg_holder_incarnation"]))
        return not found or found[0]["boot_id"] == boot_id()

    def _locked(self, c: Conn, name: str, me: Member) -> tuple[Row | None, Row | None]:
        """The lease row and its holder's instance row, both locked ``FOR UPDATE`` (the
        instance first). None for a lease never taken: a racing first take then inserts it
        first, and ours meets the conflict and re-reads it as held."""
        for _ in range(20):
            peek = fetch(c, "SELECT holder_id, holder_incarnation FROM leases WHERE name = %s",
                         (name,))
            holder = _member(peek[0]["holder_id"], peek[0]["holder_incarnation"]) if peek else None
            hrow = None
            if holder is not None and holder != (me[0], int(me[1])):
                found = fetch(c, "SELECT * FROM instances WHERE id = %s AND incarnation = %s "
                              "FOR UPDATE", holder)
                hrow = found[0] if found else None
            elif holder is not None:
                hrow = fetch(c, "SELECT * FROM instances WHERE id = %s AND incarnation = %s",
                             holder)[0]
            if not peek:
                # Claim the name (a free row of no term) so that takers queue on its lock.
                c.execute("INSERT INTO leases (name, term, ttl) VALUES (%s, 0, 0) "
                          "ON CONFLICT (name) DO NOTHING", (name,))
            rows = self._clock.checked(c, f"{_SELECT} WHERE name = %s FOR UPDATE", (name,))
            row = rows[0]
            if _member(row["holder_id"], row["holder_incarnation"]) == holder:
                return (None if row["term"] == 0 else row), hrow
        # The lease kept changing hands under us: run the whole take again.
        raise pgerrors.SerializationFailure(f"lease {name!r} kept changing hands")

    def renew(self, name: str, term: int, holder: Member, ttl: float) -> bool:
        def txn(c: Conn) -> bool:
            # Checked: the holder's own renewal finds a step, and is then made under the hold.
            if self._clock.checked(c, _RENEW, (ttl, name, term, *holder))[0]["ok"]:
                return True
            self._clock.verified(c, free_term(c, name, term, "expired", holder, lapsed=True))
            return False

        return self._db.write(txn)

    def release(self, name: str, term: int, holder: Member | None, reason: str,
                **detail: Any) -> bool:
        return self._db.write(lambda c: free_term(c, name, term, reason, holder, **detail))

    def release_dead_holders(self, members: Sequence[Member], reason: str) -> int:
        return self._db.write(lambda c: free_held(c, list(members), reason))

    def expire(self) -> int:
        return self._db.write(lambda c: self._clock.verified(c, expire_lapsed(c)))

    def lapsed(self) -> int:
        return int(self._db.value("SELECT count(*) FROM leases WHERE holder_id IS NOT NULL "  # noqa: S608 - fixed fragments
                                  f"AND {LEASE_EXPIRY} < coord_now()"))

    def record_group(self, name: str, term: int, pgid: int | None, token: int | None,
                     holder: Member | None) -> None:
        def txn(c: Conn) -> None:
            self._require(c, name, term, change=True)
            hid, hinc = holder if holder is not None else (None, None)
            c.execute("UPDATE leases SET pgid = %s, pg_start_token = %s, pg_holder_id = %s, "
                      "pg_holder_incarnation = %s WHERE name = %s AND term = %s",
                      (pgid, token, hid, hinc, name, term))

        self._db.write(txn)

    def clear_groups(self, groups: Iterable[tuple[str, int, int]]) -> None:
        todo = list(groups)
        if todo:
            self._db.write(lambda c: c.cursor().executemany(
                "UPDATE leases SET pgid = NULL, pg_start_token = NULL, pg_holder_id = NULL, "
                "pg_holder_incarnation = NULL WHERE name = %s AND pgid = %s "
                "AND pg_start_token = %s", todo))

    def forget(self, name: str) -> bool:
        def txn(c: Conn) -> bool:
            # The row locked first: a taker racing this waits, then finds no row and makes
            # a new one (its term from the sequence, still above every forgotten one).
            held = fetch(c, "SELECT holder_id FROM leases WHERE name = %s FOR UPDATE", (name,))
            if not held or held[0]["holder_id"] is not None:
                return False
            c.execute("DELETE FROM lease_terms WHERE name = %s", (name,))
            return c.execute("DELETE FROM leases WHERE name = %s", (name,)).rowcount > 0

        return self._db.write(txn)

    # -- fenced operations --------------------------------------------------------------------

    def fenced(self, name: str, term: int, statements: Statements) -> list[list[Row]]:
        """Engine-specific: run PostgreSQL statements (``%s`` placeholders) in one
        transaction, only while ``term`` is current; their rows (none for a statement that
        returns none). ``LeaseLost`` otherwise."""
        def txn(c: Conn) -> list[list[Row]]:
            self._require(c, name, term)
            out: list[list[Row]] = []
            for sql, params in statements:
                # No parameters: the statement is run as written (a literal % stays one).
                cur = c.execute(sql, params or None)  # type: ignore[arg-type]
                out.append(cur.fetchall() if cur.description is not None else [])
            return out

        return self._db.write(txn)

    def fenced_kv_set(self, name: str, term: int, key: str, value: str,
                      owner: Member | None) -> int:
        def txn(c: Conn) -> int:
            self._kv.lock_owner(c, owner)  # instances before leases
            self._require(c, name, term)
            return self._kv.set_in(c, key, value, owner)

        return self._db.write(txn)

    def fenced_kv_cas(self, name: str, term: int, key: str, value: str, version: int,
                      owner: Member | None) -> int:
        def txn(c: Conn) -> int:
            self._kv.lock_owner(c, owner)
            self._require(c, name, term)
            return self._kv.cas_in(c, key, value, version, owner)

        return self._db.write(txn)

    def fenced_queue_put(self, name: str, term: int, queue: str, rows: Sequence[NewJobRow]
                         ) -> tuple[list[int], bool, str | None]:
        """``QueueOps.put_rows`` with the lease row held ``FOR SHARE`` from the check that
        ``term`` is current to the commit (leases before queues): a refused put makes no
        queue either."""
        def txn(c: Conn) -> tuple[list[int], bool, str | None]:
            self._require(c, name, term)
            return put_in(c, queue, rows)

        return into_queue(self._db, txn)

    def _require(self, c: Conn, name: str, term: int, *, change: bool = False) -> None:
        """Hold the lease row until commit (to ``change`` it: exclusively), or ``LeaseLost``
        unless ``term`` is current."""
        if not fetch(c, _CURRENT_FOR_UPDATE if change else _CURRENT, (name, term)):
            self._clock.verify(c)  # refused before a step was seen: checked under the hold
            raise LeaseLost(name, term)
