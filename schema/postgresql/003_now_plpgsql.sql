-- coord schema on PostgreSQL, version 3: coord_now() and coord_expiry() in PL/pgSQL.
--
-- coord_now() in PL/pgSQL, the same clock (the server's wall clock in seconds plus the test
-- offset). A SQL function with a SET clause is never inlined and plans its body again in
-- every statement that calls it (about 35 µs, then 14 µs a call: an ack calls it three
-- times); PL/pgSQL keeps its plan for the session (about 3 µs a call).
CREATE OR REPLACE FUNCTION coord_now() RETURNS double precision
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
    AS $$ BEGIN
        RETURN extract(epoch FROM clock_timestamp())::double precision
               + (SELECT offset_s FROM clock_offset);
    END $$;

-- coord_expiry() (version 2) likewise: every expiry check calls it.
CREATE OR REPLACE FUNCTION coord_expiry(stamp double precision, ttl double precision)
    RETURNS double precision
    LANGUAGE plpgsql STABLE SET search_path FROM CURRENT
    AS $$ BEGIN
        RETURN stamp + greatest(0, (SELECT held_since FROM server_epoch) + ttl - stamp);
    END $$;
