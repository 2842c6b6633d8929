-- Views for people reading the database with plain SQL (`sqlite3 "$(coord path)"`).
-- They see only what SQL can see: a crash is proven by coord's liveness check (record lock,
-- pid and start token), not by these views, which judge by heartbeat age on the wall clock.

-- Registered instances whose last heartbeat is within their TTL (wall-clock age).
CREATE VIEW live_instances AS
SELECT id, incarnation, app, pid, user, host, cwd, cmdline, labels,
       datetime(started_at, 'unixepoch') AS started,
       round(unixepoch('subsec') - heartbeat_at, 3) AS heartbeat_age_s
FROM instances
WHERE status = 'alive' AND unixepoch('subsec') - heartbeat_at <= ttl;

-- Held leases: who leads what, since when, with which fencing term.
CREATE VIEW leaders AS
SELECT name, holder_id, holder_incarnation, term,
       datetime(acquired_at, 'unixepoch') AS since,
       datetime(renewed_at, 'unixepoch') AS renewed
FROM leases
WHERE holder_id IS NOT NULL;

-- Per-queue counts by state (a 'ready' job that is not yet due is still counted as ready
-- here; `coord queue stats` separates delayed ones).
CREATE VIEW queue_depths AS
SELECT q.name AS queue, q.owner_id,
       count(j.id) FILTER (WHERE j.state = 'ready') AS ready,
       count(j.id) FILTER (WHERE j.state = 'claimed') AS claimed,
       count(j.id) FILTER (WHERE j.state = 'dead') AS dead,
       count(j.id) FILTER (WHERE j.state = 'done') AS done
FROM queues q LEFT JOIN jobs j ON j.queue = q.name
GROUP BY q.name;

-- Tracked processes still marked running whose instance is a tombstone.
CREATE VIEW orphan_processes AS
SELECT p.id, p.instance_id, p.pid, p.name, p.cmdline, datetime(p.started_at, 'unixepoch') AS started
FROM processes p JOIN instances i ON i.id = p.instance_id
WHERE p.status = 'running' AND (i.status = 'dead' OR i.incarnation <> p.incarnation);

-- The last 100 events, newest first, with readable times.
CREATE VIEW recent_events AS
SELECT id, datetime(at, 'unixepoch') AS at, kind, instance_id, subject, detail
FROM events ORDER BY id DESC LIMIT 100;
