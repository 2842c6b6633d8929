-- coord schema on PostgreSQL, version 1: the whole data model, in one schema per deployment
-- (the URL's ?schema=NAME; every connection's search_path is that schema alone).
--
-- The same tables and columns as on SQLite (schema/sqlite/), so `coord sql` reads alike on
-- both engines. Conventions, true of every table:
--   * Times named *_at are wall-clock seconds since the epoch (double precision), for people.
--   * Times named *_mono are readings of coord_now(), the SERVER's clock. Every expiry is
--     stamped and compared in SQL with coord_now(), never with a client's clock, so hosts
--     whose clocks disagree get the same verdicts.
--   * Payloads, labels, results and command lines are JSON text (as on SQLite).
--   * An instance is named by its id; what it holds is bound to (id, incarnation).
--   * "user" is quoted: it is a reserved word here.

-- Small facts about the schema itself: schema_version (the migration ladder), created_at.
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Counters of events coord wants to report (busy_retries: writes retried after a
-- serialization failure or deadlock).
CREATE TABLE counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);

-- What coord_now() adds to the server's clock: always 0 in production. Tests that fake a
-- step of the server's clock set it (one row).
CREATE TABLE clock_offset (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    offset_s double precision NOT NULL DEFAULT 0
);
INSERT INTO clock_offset DEFAULT VALUES;

-- The one clock every expiry uses: the server's wall clock in seconds, plus the test offset.
-- clock_timestamp() (not now()): it advances inside a transaction.
CREATE FUNCTION coord_now() RETURNS double precision
    LANGUAGE sql VOLATILE SET search_path FROM CURRENT
    AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision
                 + (SELECT offset_s FROM clock_offset) $$;

-- The server's epoch: crash recovery empties an UNLOGGED table, so a missing row means the
-- server restarted since (every session and advisory lock gone) even when
-- pg_postmaster_start_time() did not change (a backend crash reinitialises the server).
-- held_since: coord_now() when a reader last saw the server's clock step forward (see
-- coord/backend/postgresql/clock.py); heartbeats older than it are judged from it.
CREATE UNLOGGED TABLE server_epoch (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    token      text NOT NULL,
    since      double precision NOT NULL,
    held_since double precision
);

-- Sequences that never go backwards; seeded with the wall clock in milliseconds when the
-- schema is created (below), so a recreated schema hands out higher values than the one it
-- replaced:
--   incarnation_seq  one per registration, global: (id, incarnation) is never reused;
--   term_seq         lease fencing tokens;
--   revision_seq     the kv store's global modification counter (versions for compare-and-set).
DO $$
DECLARE seed bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
BEGIN
    EXECUTE format('CREATE SEQUENCE incarnation_seq START %s', seed);
    EXECUTE format('CREATE SEQUENCE term_seq START %s', seed);
    EXECUTE format('CREATE SEQUENCE revision_seq START %s', seed);
END $$;

-- Every registered instance, alive or a tombstone. One row per id; re-registering an id
-- replaces the row with a new incarnation. host and boot_id say where its process runs:
-- only a coord process on that host and boot can prove it dead from its pid (the others wait
-- for its heartbeat to expire by the server's clock). machine_id names the host (its
-- /etc/machine-id, else "host:" and its host name): a row of this machine with another
-- boot_id is of a boot that is over, and only that machine buries it as 'reboot'. lock_path
-- is its host-local proof of life (a record lock in that host's runtime directory).
CREATE TABLE instances (
    id             text PRIMARY KEY,
    incarnation    bigint NOT NULL,
    app            text NOT NULL,
    status         text NOT NULL DEFAULT 'alive' CHECK (status IN ('alive', 'dead')),
    pid            bigint NOT NULL,
    start_token    bigint NOT NULL,
    boot_id        text NOT NULL,
    pidns          text NOT NULL,
    uid            bigint NOT NULL,
    "user"         text NOT NULL,
    host           text NOT NULL,
    machine_id     text NOT NULL DEFAULT '',
    cmdline        text NOT NULL DEFAULT '[]',
    cwd            text NOT NULL DEFAULT '',
    labels         text NOT NULL DEFAULT '{}',
    lock_path      text NOT NULL,
    nudge_path     text,
    ttl            double precision NOT NULL,
    watchdog       double precision,
    started_at     double precision NOT NULL,
    heartbeat_at   double precision NOT NULL,
    heartbeat_mono double precision NOT NULL,
    ended_at       double precision,
    end_reason     text
);
CREATE INDEX instances_app ON instances (app, status);
CREATE INDEX instances_machine ON instances (machine_id, boot_id) WHERE status = 'alive';

-- Processes an instance tracks (spawn/track) and the recorded process trees of `coord run`/
-- `elect`/`lock` wrappers (tree = true), bound to (instance_id, incarnation). Host-local:
-- only a process on the instance's host and boot signals or probes them.
CREATE TABLE processes (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  text NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    incarnation  bigint NOT NULL,
    pid          bigint NOT NULL,
    start_token  bigint NOT NULL,
    boot_id      text NOT NULL,
    pgid         bigint,
    name         text NOT NULL,
    cmdline      text NOT NULL DEFAULT '[]',
    cwd          text NOT NULL DEFAULT '',
    "user"       text NOT NULL DEFAULT '',
    labels       text NOT NULL DEFAULT '{}',
    log_path     text,
    status       text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'exited')),
    started_at   double precision NOT NULL,
    ended_at     double precision,
    exit_code    bigint,
    signal       bigint,
    tree         integer NOT NULL DEFAULT 0 CHECK (tree IN (0, 1))
);
CREATE INDEX processes_instance ON processes (instance_id, status);
CREATE INDEX processes_tree ON processes (instance_id, incarnation) WHERE tree = 1 AND status = 'running';

-- Leases fenced by terms: one row per lease name, the current holder (or none) and its term
-- from term_seq. expires_mono is coord_now() + ttl at the last take or renewal. pgid,
-- pg_start_token and pg_holder_* name the process group of the term's CMD and the instance
-- whose tree runs in it; they stay after the holder's end until the group is proven empty.
CREATE TABLE leases (
    name                  text PRIMARY KEY,
    holder_id             text,
    holder_incarnation    bigint,
    term                  bigint NOT NULL,
    ttl                   double precision NOT NULL,
    acquired_at           double precision,
    renewed_at            double precision,
    expires_mono          double precision,
    pgid                  bigint,
    pg_start_token        bigint,
    pg_holder_id          text,
    pg_holder_incarnation bigint,
    CHECK ((holder_id IS NULL) = (holder_incarnation IS NULL))
);

-- One row per term ever held: who held it, when, and how it ended.
CREATE TABLE lease_terms (
    name               text NOT NULL,
    term               bigint NOT NULL,
    holder_id          text NOT NULL,
    holder_incarnation bigint NOT NULL,
    acquired_at        double precision NOT NULL,
    released_at        double precision,
    reason             text,
    PRIMARY KEY (name, term)
);

-- Named queues; a private queue has an owner instance id (its jobs keep its tombstone).
CREATE TABLE queues (
    name       text PRIMARY KEY,
    owner_id   text,
    max_depth  bigint,
    created_at double precision NOT NULL
);

-- Jobs. state 'claimed' carries the claim: claimer (id, incarnation), a claim token and
-- claim_expires_mono; finished jobs (done, dead, cancelled) stay for their retention.
CREATE TABLE jobs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue               text NOT NULL REFERENCES queues (name) ON DELETE CASCADE,
    state               text NOT NULL DEFAULT 'ready'
                        CHECK (state IN ('ready', 'claimed', 'done', 'dead', 'cancelled')),
    priority            bigint NOT NULL DEFAULT 0,
    payload             text NOT NULL,
    dedupe_key          text,
    attempts            bigint NOT NULL DEFAULT 0,
    max_attempts        bigint NOT NULL DEFAULT 5,
    available_mono      double precision NOT NULL,
    created_at          double precision NOT NULL,
    claimed_by          text,
    claimed_incarnation bigint,
    claim_token         text,
    claim_expires_mono  double precision,
    claimed_at          double precision,
    last_error          text,
    result              text,
    finished_at         double precision,
    finished_mono       double precision,
    CHECK ((state = 'claimed') = (claim_token IS NOT NULL))
);
-- Few indexes, each partial where it can be: a claim and an ack are commit-bound, and every
-- index a changed row enters adds to the WAL each one flushes. Claim order is jobs_ready's
-- order. Claims are few (those in flight): lookups of a queue's claims, expired leases and a
-- holder's claims all read jobs_claimed. A claim is found by its job id (the token's head,
-- the primary key). Counts of finished jobs (stats, purges) read the table, as on SQLite.
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'ready';
CREATE INDEX jobs_claimed ON jobs (claimed_by, claimed_incarnation) WHERE state = 'claimed';
CREATE UNIQUE INDEX jobs_dedupe ON jobs (queue, dedupe_key) WHERE dedupe_key IS NOT NULL;

-- Whether a text is JSON (payload checks; PostgreSQL 15 has no IS JSON).
CREATE FUNCTION coord_is_json(t text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE
    AS $$ BEGIN PERFORM t::json; RETURN true; EXCEPTION WHEN data_exception THEN RETURN false; END $$;

-- Envelopes between instances: messages, requests and their replies. expires_mono is the
-- server's clock; delivered_incarnation is who was given it (re-offered if that one dies).
-- seq is the arrival order (SQLite's rowid): an inbox is delivered oldest seq first.
CREATE TABLE messages (
    id                    text PRIMARY KEY,
    seq                   bigint GENERATED ALWAYS AS IDENTITY,
    kind                  text NOT NULL DEFAULT 'message'
                          CHECK (kind IN ('message', 'request', 'reply')),
    sender_id             text NOT NULL,
    sender_incarnation    bigint NOT NULL,
    recipient_id          text NOT NULL,
    topic                 text NOT NULL DEFAULT '',
    payload               text NOT NULL,
    correlation_id        text,
    reply_to              text,
    created_at            double precision NOT NULL,
    expires_at            double precision NOT NULL,
    expires_mono          double precision NOT NULL,
    delivered_incarnation bigint,
    acked                 integer NOT NULL DEFAULT 0
);
CREATE INDEX messages_inbox ON messages (recipient_id, acked, seq);
CREATE INDEX messages_expiry ON messages (expires_mono);
CREATE INDEX messages_correlation ON messages (correlation_id) WHERE correlation_id IS NOT NULL;

-- Key-value entries; version is revision_seq's value at the last write. An ephemeral key has
-- an owner (id, incarnation) and goes with it.
CREATE TABLE kv (
    key               text PRIMARY KEY,
    value             text NOT NULL,
    version           bigint NOT NULL,
    owner_id          text,
    owner_incarnation bigint,
    created_at        double precision NOT NULL,
    updated_at        double precision NOT NULL,
    CHECK ((owner_id IS NULL) = (owner_incarnation IS NULL))
);
CREATE INDEX kv_owner ON kv (owner_id, owner_incarnation) WHERE owner_id IS NOT NULL;

-- The bounded history of what happened (trimmed by the reaper).
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          double precision NOT NULL,
    kind        text NOT NULL,
    instance_id text,
    subject     text,
    detail      text NOT NULL DEFAULT '{}'
);
CREATE INDEX events_at ON events (at);

-- Views for people (the same names as on SQLite).
CREATE VIEW live_instances AS
SELECT id, incarnation, app, pid, "user", host, cwd, cmdline, labels,
       to_timestamp(started_at) AS started,
       round((coord_now() - heartbeat_mono)::numeric, 3) AS heartbeat_age_s
FROM instances
WHERE status = 'alive' AND coord_now() - heartbeat_mono <= ttl;

CREATE VIEW leaders AS
SELECT name, holder_id, holder_incarnation, term,
       to_timestamp(acquired_at) AS since, to_timestamp(renewed_at) AS renewed
FROM leases
WHERE holder_id IS NOT NULL;

CREATE VIEW queue_depths AS
SELECT q.name AS queue, q.owner_id,
       count(j.id) FILTER (WHERE j.state = 'ready') AS ready,
       count(j.id) FILTER (WHERE j.state = 'claimed') AS claimed,
       count(j.id) FILTER (WHERE j.state = 'dead') AS dead,
       count(j.id) FILTER (WHERE j.state = 'done') AS done
FROM queues q LEFT JOIN jobs j ON j.queue = q.name
GROUP BY q.name;

CREATE VIEW orphan_processes AS
SELECT p.id, p.instance_id, p.pid, p.name, p.cmdline, to_timestamp(p.started_at) AS started
FROM processes p JOIN instances i ON i.id = p.instance_id
WHERE p.status = 'running' AND (i.status = 'dead' OR i.incarnation <> p.incarnation);

CREATE VIEW recent_events AS
SELECT id, to_timestamp(at) AS at, kind, instance_id, subject, detail
FROM events ORDER BY id DESC LIMIT 100;
