-- coord schema on PostgreSQL, version 2: a step of the server's clock holds every expiry back.
--
-- When a reader has seen coord_now() step forward (server_epoch.held_since, recorded by
-- coord/backend/postgresql/clock.py), stamps written before the step are an hour (or
-- whatever the step was) old at once. Nothing may expire by that: whatever was stamped to
-- expire at `stamp`, `ttl` seconds after it was last renewed, expires no sooner than one
-- `ttl` after the step was seen, so its holder, if alive, renews it first. Every expiry of
-- the engine is `coord_expiry(stamp, ttl) < coord_now()` (a NULL ttl is never held back);
-- a row that is still valid has `coord_expiry(stamp, ttl) >= coord_now()`.
CREATE FUNCTION coord_expiry(stamp double precision, ttl double precision)
    RETURNS double precision
    LANGUAGE sql STABLE SET search_path FROM CURRENT
    AS $$ SELECT stamp + greatest(0, (SELECT held_since FROM server_epoch) + ttl - stamp) $$;

-- The lease of a claim (its last claim or extension) in seconds: the ttl of its hold.
ALTER TABLE jobs ADD COLUMN claim_lease double precision;

CREATE OR REPLACE VIEW live_instances AS
SELECT id, incarnation, app, pid, "user", host, cwd, cmdline, labels,
       to_timestamp(started_at) AS started,
       round((coord_now() - heartbeat_mono)::numeric, 3) AS heartbeat_age_s
FROM instances
WHERE status = 'alive' AND coord_expiry(heartbeat_mono + ttl, ttl) >= coord_now();
