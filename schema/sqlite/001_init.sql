-- coord schema, version 1: the whole data model.
--
-- Conventions, true of every table:
--   * Times named *_at are wall-clock seconds since the epoch (REAL). They are for people and
--     are never used to decide expiry.
--   * Times named *_mono are CLOCK_MONOTONIC seconds of the boot named in meta.boot_id. Every
--     expiry decision uses them. When a database is opened on a new boot, coord rebases them
--     once (see meta.boot_id), so a query never has to compare two boots.
--   * Payloads, labels, results and command lines are JSON text.
--   * An instance is named by its id; what it holds is bound to (id, incarnation), so a
--     restarted instance that takes over an old id never inherits what its predecessor held.

-- Small facts about the database itself: boot_id (the boot whose monotonic clock the *_mono
-- columns use), created_at.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- Sequences that must never go backwards, not even when the rows they numbered are deleted:
--   incarnation  one per registration, global, so (id, incarnation) is never reused;
--   term         lease fencing tokens, seeded from the wall clock in milliseconds at creation,
--                so a recreated database hands out higher terms than the one it replaced;
--   revision     the kv store's global modification counter (versions for compare-and-set).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

-- Every registered instance, alive or a tombstone. One row per id; re-registering an id
-- bumps incarnation. status: 'alive' (registered; liveness is still checked by proof of death
-- and heartbeat age), 'dead' (a tombstone kept while it owns queued jobs or running
-- processes). Liveness in SQL alone cannot see a crash; use `coord instances` or the
-- live_instances view (heartbeat age only) for a person's view.
CREATE TABLE instances (
    id             TEXT PRIMARY KEY,
    incarnation    INTEGER NOT NULL,
    app            TEXT NOT NULL,
    status         TEXT NOT NULL DEFAULT 'alive' CHECK (status IN ('alive', 'dead')),
    pid            INTEGER NOT NULL,
    start_token    INTEGER NOT NULL,      -- field 22 of /proc/<pid>/stat: ticks after boot
    boot_id        TEXT NOT NULL,         -- /proc/sys/kernel/random/boot_id at registration
    pidns          TEXT NOT NULL,         -- the pid namespace, as readlink /proc/self/ns/pid
    uid            INTEGER NOT NULL,
    user           TEXT NOT NULL,
    host           TEXT NOT NULL,
    cmdline        TEXT NOT NULL DEFAULT '[]',   -- JSON array of arguments
    cwd            TEXT NOT NULL DEFAULT '',
    labels         TEXT NOT NULL DEFAULT '{}',   -- JSON object
    lock_path      TEXT NOT NULL,         -- the record lock held for life: proof of death
    nudge_path     TEXT,                  -- datagram socket that wakes its waiters
    ttl            REAL NOT NULL,         -- heartbeat time to live, seconds
    watchdog       REAL,                  -- progress watchdog interval; NULL = off
    started_at     REAL NOT NULL,
    heartbeat_at   REAL NOT NULL,
    heartbeat_mono REAL NOT NULL,
    ended_at       REAL,
    end_reason     TEXT                   -- 'left', 'died', 'hung', 'reboot', 'taken over'
) STRICT;
CREATE INDEX instances_app ON instances (app, status);

-- Child processes tracked per instance. A row names a process by (boot_id, pid, start_token);
-- a pid whose start token no longer matches is some other process and is never signalled.
-- status: 'running', 'exited' (ended; exit_code or signal when known).
CREATE TABLE processes (
    id           INTEGER PRIMARY KEY,
    instance_id  TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    incarnation  INTEGER NOT NULL,
    pid          INTEGER NOT NULL,
    start_token  INTEGER NOT NULL,
    boot_id      TEXT NOT NULL,
    pgid         INTEGER,
    name         TEXT NOT NULL,
    cmdline      TEXT NOT NULL DEFAULT '[]',
    cwd          TEXT NOT NULL DEFAULT '',
    user         TEXT NOT NULL DEFAULT '',
    labels       TEXT NOT NULL DEFAULT '{}',
    log_path     TEXT,
    status       TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'exited')),
    started_at   REAL NOT NULL,
    ended_at     REAL,
    exit_code    INTEGER,
    signal       INTEGER
) STRICT;
CREATE INDEX processes_instance ON processes (instance_id, status);

-- Leases: leader election and mutual exclusion. A free lease keeps its row (holder NULL) so
-- its last term stays visible. term is the fencing token: it comes from counters.term and
-- changes on every change of holder, so it strictly increases and is never reused.
-- pgid/pg_* record the process group a `coord elect`/`coord lock` command runs in, so the
-- next holder can end it (identity checked) before starting its own.
CREATE TABLE leases (
    name               TEXT PRIMARY KEY,
    holder_id          TEXT,
    holder_incarnation INTEGER,
    term               INTEGER NOT NULL,
    ttl                REAL NOT NULL,
    acquired_at        REAL,
    renewed_at         REAL,
    expires_mono       REAL,
    pgid               INTEGER,
    pg_start_token     INTEGER,
    CHECK ((holder_id IS NULL) = (holder_incarnation IS NULL))
) STRICT;

-- One row per term a lease was held: the history that proves one holder per term and that
-- terms only grow. Trimmed with the event log.
CREATE TABLE lease_terms (
    name               TEXT NOT NULL,
    term               INTEGER NOT NULL,
    holder_id          TEXT NOT NULL,
    holder_incarnation INTEGER NOT NULL,
    acquired_at        REAL NOT NULL,
    released_at        REAL,
    reason             TEXT,              -- 'released', 'expired', 'died', 'stepped down'
    PRIMARY KEY (name, term)
) STRICT;

-- Queues. owner_id NULL: shared, any live instance claims. Otherwise private: only the owner
-- (any incarnation of that id) claims. max_depth NULL: unbounded.
CREATE TABLE queues (
    name       TEXT PRIMARY KEY,
    owner_id   TEXT,
    max_depth  INTEGER,
    created_at REAL NOT NULL
) STRICT;

-- Jobs. state: 'ready' (claimable once available_mono has passed; before that a person sees it
-- as 'delayed'), 'claimed' (by claimed_by/claimed_incarnation, token claim_token, until
-- claim_expires_mono), 'done' (acked; result kept until purged), 'dead' (out of attempts, last
-- error kept), 'cancelled'. Claim order: priority DESC, then id (FIFO).
-- dedupe_key is unique within a queue until the job row is purged.
-- The claim token is "<job id>-<random>". Of the indexes below, version 4
-- (004_queue_hot.sql) keeps jobs_dedupe and replaces the other four by jobs_active.
CREATE TABLE jobs (
    id                  INTEGER PRIMARY KEY,
    queue               TEXT NOT NULL REFERENCES queues (name) ON DELETE CASCADE,
    state               TEXT NOT NULL DEFAULT 'ready'
                        CHECK (state IN ('ready', 'claimed', 'done', 'dead', 'cancelled')),
    priority            INTEGER NOT NULL DEFAULT 0,
    payload             TEXT NOT NULL,
    dedupe_key          TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL DEFAULT 5,
    available_mono      REAL NOT NULL,
    created_at          REAL NOT NULL,
    claimed_by          TEXT,
    claimed_incarnation INTEGER,
    claim_token         TEXT,
    claim_expires_mono  REAL,
    claimed_at          REAL,
    last_error          TEXT,
    result              TEXT,
    finished_at         REAL,
    finished_mono       REAL,
    CHECK ((state = 'claimed') = (claim_token IS NOT NULL))
) STRICT;
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, id) WHERE state = 'ready';
CREATE INDEX jobs_claimed ON jobs (claimed_by, claimed_incarnation) WHERE state = 'claimed';
CREATE INDEX jobs_state ON jobs (queue, state);
CREATE UNIQUE INDEX jobs_dedupe ON jobs (queue, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE UNIQUE INDEX jobs_token ON jobs (claim_token) WHERE claim_token IS NOT NULL;

-- Messages between instances. kind: 'message' (send/broadcast), 'request' (expects a reply
-- with correlation_id = its id), 'reply'. A message is delivered when a receive() by the
-- recipient commits delivered_incarnation; until it is acked (the recipient's next receive,
-- or an explicit ack) a restart of the recipient with the same id gets it again.
CREATE TABLE messages (
    id                    TEXT PRIMARY KEY,   -- UUID
    kind                  TEXT NOT NULL DEFAULT 'message'
                          CHECK (kind IN ('message', 'request', 'reply')),
    sender_id             TEXT NOT NULL,
    sender_incarnation    INTEGER NOT NULL,
    recipient_id          TEXT NOT NULL,
    topic                 TEXT NOT NULL DEFAULT '',
    payload               TEXT NOT NULL,
    correlation_id        TEXT,
    reply_to              TEXT,
    created_at            REAL NOT NULL,
    expires_at            REAL NOT NULL,
    expires_mono          REAL NOT NULL,
    delivered_incarnation INTEGER,
    acked                 INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX messages_inbox ON messages (recipient_id, acked, topic, created_at);
CREATE INDEX messages_expiry ON messages (expires_mono);
CREATE INDEX messages_correlation ON messages (correlation_id) WHERE correlation_id IS NOT NULL;

-- Shared context: keys with JSON values. version comes from counters.revision, so it never
-- repeats for a key even after delete and re-create (no ABA for compare-and-set).
-- An ephemeral key is bound to (owner_id, owner_incarnation) and vanishes with it.
CREATE TABLE kv (
    key               TEXT PRIMARY KEY,
    value             TEXT NOT NULL,
    version           INTEGER NOT NULL,
    owner_id          TEXT,
    owner_incarnation INTEGER,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL,
    CHECK ((owner_id IS NULL) = (owner_incarnation IS NULL))
) STRICT;
CREATE INDEX kv_owner ON kv (owner_id, owner_incarnation) WHERE owner_id IS NOT NULL;

-- The event log: joined, left, died, hung, reaped, took over, leader changed, job
-- dead-lettered ... Bounded by the reaper (10 000 rows or 7 days by default).
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    kind        TEXT NOT NULL,
    instance_id TEXT,
    subject     TEXT,
    detail      TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX events_at ON events (at);
