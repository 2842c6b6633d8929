-- coord schema, version 4: the queue's hot path.
--
-- A claim and an ack commit every b-tree page they change into the WAL, so what they cost is
-- mostly how many indexes they touch. Version 1 kept four indexes on jobs, and a claim plus
-- its ack changed all four (ready, claimed, state and token) besides the row. Here one
-- partial index holds only the jobs that are still in play (ready, delayed or claimed):
--
--   * a put adds one entry; a claim moves it from the 'ready' range to the 'claimed' range;
--     an ack (or dead-lettering, or cancel) removes it: finished jobs leave the index, so it
--     stays as small as the work in flight, however many done jobs are kept for retention;
--   * claim order is the index order within (state 'ready', queue): priority DESC, then id
--     (FIFO). available_mono is in the entry so skipping a delayed job reads no row;
--   * the claims of one queue ('claimed', queue) and of all queues ('claimed') are ranges of
--     it, so the death rule and the lease checks find claims without a second index;
--   * a claim token is "<job id>-<random>": a claim is found by its job id and the token
--     compared, so tokens need no index of their own (their uniqueness comes from the id).
--
-- The WHERE clause is written as an OR, not IN: SQLite uses a partial index only for a query
-- whose WHERE implies the index's, and it proves that for `state = 'ready'` (or 'claimed')
-- against an OR of equalities, not against an IN list.
--
-- What reads finished jobs by queue (coord queue stats, the queue_depths view, purge,
-- requeue --dead, adopt) now reads the table: that is for people and maintenance, never on
-- a put's, claim's or ack's path.
-- jobs_dedupe (queue, dedupe_key) stays: a dedupe key is unique until the job is purged.

DROP INDEX IF EXISTS jobs_ready;
DROP INDEX IF EXISTS jobs_claimed;
DROP INDEX IF EXISTS jobs_state;
DROP INDEX IF EXISTS jobs_token;

CREATE INDEX jobs_active ON jobs (state, queue, priority DESC, id, available_mono)
    WHERE state = 'ready' OR state = 'claimed';
