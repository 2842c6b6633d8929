"""The statements of a message's round trip on PostgreSQL, each one statement in autocommit
(one round trip to the server, its own transaction): a send or request, a receive, a reply.

Each keeps the rules of the transaction it replaces (``.messages``):

- The writer's own instance row (and a send's recipient's) is locked ``FOR SHARE`` before
  anything is written, and every write of the statement is conditional on what that lock
  read: the death rule locks the row ``FOR UPDATE``, so a burial either waits for the
  statement or the statement waits for the burial and then writes nothing (under READ
  COMMITTED the lock reads the newest version of the row).
- A data-modifying CTE runs once whether or not it is read; the ones here touch disjoint
  rows (no row is changed twice in one statement).
- Every statement also deletes the replies its instance has taken since its last write
  (``%(spent)s``, an empty array when there are none).
- The NOTIFY is sent by the statement (delivered at its commit) only when it wrote.
"""

from __future__ import annotations

from .clock import MESSAGE_EXPIRY
from .listen import INBOX_CHANNEL_SQL

#: Longest NOTIFY payload sent, in bytes (the server's limit is just under 8000).
NOTE_MAX = 7900

# Replies this instance took and has not deleted yet.
_SPENT = ("spent AS (DELETE FROM messages WHERE recipient_id = %(me)s AND kind = 'reply' "
          "AND id = ANY(%(spent)s::text[]))")

# One envelope, stamped once from the server's clock: %(ttl)s seconds on, or with %(until)s
# (a reply) when the request would have expired, at least a second from now. The caller
# appends its own WHERE (the condition its locks read).
INSERT = (
    "INSERT INTO messages (id, kind, sender_id, sender_incarnation, recipient_id, topic, "
    "payload, correlation_id, reply_to, created_at, expires_at, expires_mono) "
    "SELECT %(id)s, %(kind)s, %(me)s, %(inc)s, %(to)s, %(topic)s, %(payload)s, %(corr)s, "
    "%(reply_to)s, n.t, n.t + d.ttl, n.t + d.ttl "
    "FROM (SELECT coord_now() AS t) AS n, LATERAL (SELECT coalesce(%(ttl)s::float8, "
    "greatest(%(until)s::float8 - n.t, 1.0)) AS ttl) AS d"
)

#: A send or a request to one instance: lock the sender's and the recipient's rows (in id
#: order), insert when the sender is alive in its incarnation and the recipient is there
#: (alive, for a request: ``%(alive)s``), NOTIFY its inbox. Returns the locked rows, with
#: the server's clock at the lock (``read_now``), and whether it wrote. A request's commit
#: does not wait for the WAL flush: a request is only of use while its sender waits, a
#: server crash ends every wait with an error, and the flush of its reply's commit (which
#: is synchronous) covers it. A plain message's send is durable when it returns.
SEND = (
    "WITH who AS (SELECT id, incarnation, status, nudge_path, boot_id, pid, pidns, "  # noqa: S608 - fixed fragments
    "start_token, heartbeat_mono, ttl, lock_path, coord_now() AS read_now FROM instances "
    "WHERE id = ANY(%(ids)s::text[]) ORDER BY id FOR SHARE), "
    "ok AS (SELECT EXISTS (SELECT 1 FROM who WHERE id = %(me)s AND incarnation = %(inc)s "
    "AND status = 'alive') AND EXISTS (SELECT 1 FROM who WHERE id = %(to)s "
    "AND (status = 'alive' OR NOT %(alive)s)) AS ok), "
    f"ins AS ({INSERT} WHERE (SELECT ok FROM ok) RETURNING 1), {_SPENT} "
    "SELECT who.*, (SELECT count(pg_notify(%(channel)s, '')) FROM ins) AS wrote, "
    "set_config('synchronous_commit', CASE WHEN %(kind)s = 'request' THEN 'off' "
    "ELSE current_setting('synchronous_commit') END, true) AS commit_mode FROM who"
)

#: A receive: the oldest message for this incarnation not yet given to it (``cand``), and
#: whether earlier deliveries await their acknowledgement (``owed``). Only when there is
#: one does it lock its own row (an empty look writes nothing, so costs no commit); alive,
#: it acknowledges what was owed (the 'next receive' rule: a message deleted, a request kept
#: as acked) and marks the candidate delivered. One row: ``alive`` (NULL when it looked at
#: nothing to do, or its row is gone), ``found``, ``owed``, and the delivered message's
#: columns (NULL when none: another receiver of the same instance took it first).
#: Its commit does not wait for the WAL flush (``synchronous_commit`` off for this
#: transaction alone): what a server crash could lose of it is a delivery mark or an
#: acknowledgement, and the message is then delivered again — at least once, as promised.
#: The flush of the next synchronous commit (the reply, say) covers it.
RECEIVE = (
    "WITH cand AS (SELECT id FROM messages WHERE recipient_id = %(me)s AND acked = 0 "  # noqa: S608 - fixed fragments
    "AND kind <> 'reply' AND (delivered_incarnation IS NULL OR "
    f"delivered_incarnation <> %(inc)s) AND {MESSAGE_EXPIRY} > (SELECT coord_now()) "
    "AND (%(topic)s::text IS NULL OR topic = %(topic)s) ORDER BY seq LIMIT 1), "
    "owed AS (SELECT 1 FROM messages WHERE recipient_id = %(me)s AND acked = 0 "
    "AND delivered_incarnation = %(inc)s LIMIT 1), "
    "mine AS (SELECT status = 'alive' AND incarnation = %(inc)s AS alive FROM instances "
    "WHERE id = %(me)s AND (EXISTS (SELECT 1 FROM cand) OR EXISTS (SELECT 1 FROM owed)) "
    "FOR SHARE), "
    "gone AS (DELETE FROM messages WHERE recipient_id = %(me)s AND acked = 0 "
    "AND delivered_incarnation = %(inc)s AND kind = 'message' AND (SELECT alive FROM mine)), "
    "kept AS (UPDATE messages SET acked = 1 WHERE recipient_id = %(me)s AND acked = 0 "
    "AND delivered_incarnation = %(inc)s AND kind = 'request' AND (SELECT alive FROM mine)), "
    "got AS (UPDATE messages SET delivered_incarnation = %(inc)s WHERE id = "
    "(SELECT id FROM cand) AND acked = 0 AND (delivered_incarnation IS NULL OR "
    "delivered_incarnation <> %(inc)s) AND (SELECT alive FROM mine) RETURNING *), "
    f"{_SPENT} "
    "SELECT (SELECT alive FROM mine) AS alive, EXISTS (SELECT 1 FROM cand) AS found, "
    "EXISTS (SELECT 1 FROM owed) AS owed, set_config('synchronous_commit', 'off', true) "
    "AS commit_mode, got.* FROM (SELECT 1) AS one LEFT JOIN got ON true"
)

# The reply itself as its NOTIFY's payload, when it fits (the server refuses 8000 bytes or
# more): its envelope as a JSON object, a newline, its payload's text as stored. The
# requester takes the reply from it without reading the row (``.messages``); the row is
# written all the same and deleted by the requester, as a reply read from the table is.
_NOTE = ("json_build_object('id', id, 'kind', kind, 'sender_id', sender_id, "
         "'sender_incarnation', sender_incarnation, 'recipient_id', recipient_id, "
         "'topic', topic, 'correlation_id', correlation_id, 'reply_to', reply_to, "
         "'created_at', created_at, 'expires_at', expires_at)::text || E'\\n' || payload")
_REPLY_NOTE = f"CASE WHEN octet_length({_NOTE}) < {NOTE_MAX} THEN {_NOTE} ELSE '' END"

#: A reply: lock its own row; alive, take (delete) the request addressed to it, lock the
#: requester's row in the request's incarnation and, when it is alive, insert the reply
#: (living as long as the request would have) and NOTIFY the requester's inbox. One row:
#: ``alive``, ``took`` (a request was there), ``wrote`` and the requester's nudge path and
#: boot (NULL when it is gone).
REPLY = (
    "WITH mine AS (SELECT status = 'alive' AND incarnation = %(inc)s AS alive FROM instances "  # noqa: S608 - fixed fragments
    "WHERE id = %(me)s FOR SHARE), "
    "req AS (DELETE FROM messages WHERE id = %(rid)s AND recipient_id = %(me)s "
    "AND kind = 'request' AND (SELECT alive FROM mine) RETURNING sender_id, "
    f"sender_incarnation, topic, correlation_id, {MESSAGE_EXPIRY} AS expires_mono), "
    "asker AS (SELECT i.id, i.nudge_path, i.boot_id, req.topic, req.correlation_id, "
    "req.expires_mono FROM instances AS i JOIN req ON i.id = req.sender_id "
    "AND i.incarnation = req.sender_incarnation WHERE i.status = 'alive' FOR SHARE OF i), "
    "ins AS (INSERT INTO messages (id, kind, sender_id, sender_incarnation, recipient_id, "
    "topic, payload, correlation_id, reply_to, created_at, expires_at, expires_mono) "
    "SELECT %(id)s, 'reply', %(me)s, %(inc)s, a.id, a.topic, %(payload)s, "
    "coalesce(a.correlation_id, %(rid)s), NULL, n.t, n.t + d.ttl, n.t + d.ttl "
    "FROM asker AS a, (SELECT coord_now() AS t) AS n, "
    "LATERAL (SELECT greatest(a.expires_mono - n.t, 1.0) AS ttl) AS d "
    "RETURNING *), "
    f"{_SPENT} "
    "SELECT (SELECT alive FROM mine) AS alive, (SELECT count(*) FROM req) AS took, "
    "(SELECT count(pg_notify(" + INBOX_CHANNEL_SQL.format(id="recipient_id") + ", "
    f"{_REPLY_NOTE})) FROM ins) AS wrote, a.nudge_path, a.boot_id FROM (SELECT 1) AS one "
    "LEFT JOIN asker AS a ON true"
)
