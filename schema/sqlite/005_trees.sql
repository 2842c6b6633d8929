-- coord schema, version 5: a program's whole process tree lives and dies with its instance.
--
-- `coord run`, `coord elect` and `coord lock` are child subreapers: every descendant of CMD,
-- also one that double-forked or called setsid, stays theirs. They scan /proc at least every
-- 100 ms and record each descendant as a row of `processes` with tree = 1.

-- tree: 1 for a member of a wrapper's process tree (its CMD and every descendant): ended by
-- the wrapper when CMD ends, and by the death rule (next candidate, elected reaper,
-- `coord reap`) when the wrapper dies. 0 for a process tracked with track()/spawn() (or by
-- `coord run --keep-children`): listed as an orphan until it ends or is killed.
ALTER TABLE processes ADD COLUMN tree INTEGER NOT NULL DEFAULT 0 CHECK (tree IN (0, 1));
CREATE INDEX processes_tree ON processes (instance_id, incarnation) WHERE tree = 1 AND status = 'running';

-- pg_holder_id/pg_holder_incarnation: the instance whose tree runs in the recorded group
-- (leases.pgid). The row keeps both until that group and that instance's tree are proven
-- empty, so a new holder ends the previous term's processes before its own CMD starts.
ALTER TABLE leases ADD COLUMN pg_holder_id TEXT;
ALTER TABLE leases ADD COLUMN pg_holder_incarnation INTEGER;
