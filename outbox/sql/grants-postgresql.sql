-- recrypt-outbox: what each role may do with the outbox tables, PostgreSQL.
-- Printed by `outbox db roles --print --grants --backend postgresql`.
--
-- Step 2 of 2. Run as a superuser (or as @OWNER@) connected to the outbox database, after
-- every `outbox db upgrade` (a new version may add a table):
--     psql -v ON_ERROR_STOP=1 -d @DATABASE@ -f grants.sql
-- Idempotent. Grants are per table, so a migration that adds a column needs nothing new.

-- Every role reads the schema revision: the daemon and the CLI refuse a schema not at head.
-- Only @OWNER@ (which owns the tables) may change it.
GRANT SELECT ON alembic_version TO @DAEMON@, @WRITER@, @READER@, @OPERATOR@;

-- The daemon: claims, records and purges rows; their history; its heartbeats; tombstones.
GRANT SELECT, UPDATE, DELETE ON outbox_messages TO @DAEMON@;
GRANT SELECT, INSERT, DELETE ON outbox_attempts TO @DAEMON@;
GRANT USAGE ON SEQUENCE outbox_attempts_id_seq TO @DAEMON@;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_workers TO @DAEMON@;  -- DELETE: old worker rows
-- UPDATE on outbox_tombstones only because the purge locks them (SELECT … FOR UPDATE).
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_tombstones TO @DAEMON@;
GRANT SELECT ON outbox_lanes TO @DAEMON@;
-- Operators' holds (it claims no row of a held lane or method) and requests (status shows them).
GRANT SELECT ON outbox_holds, outbox_approvals TO @DAEMON@;

-- The writer: inserts rows and reads them (enqueue refuses a key already used). It reads the
-- tombstones (a key spent by a purged row is refused) and takes a lane's lock row, which
-- SELECT … FOR UPDATE needs UPDATE for; outbox_lanes holds lane names only.
GRANT SELECT, INSERT ON outbox_messages TO @WRITER@;
GRANT USAGE ON SEQUENCE outbox_messages_id_seq TO @WRITER@;
GRANT SELECT ON outbox_tombstones TO @WRITER@;
GRANT SELECT, INSERT, UPDATE ON outbox_lanes TO @WRITER@;
GRANT SELECT ON outbox_holds, outbox_approvals TO @WRITER@;

-- The reader: everything, read-only.
GRANT SELECT ON outbox_messages, outbox_attempts, outbox_workers, outbox_tombstones,
  outbox_lanes, outbox_holds, outbox_approvals TO @READER@;

-- The operator: the reader's rights, plus requeue/cancel (a row's state, a history line),
-- hold/release (a hold's row) and dual control (a request, its decision).
GRANT SELECT ON outbox_messages, outbox_attempts, outbox_workers, outbox_tombstones,
  outbox_lanes, outbox_holds, outbox_approvals TO @OPERATOR@;
GRANT UPDATE ON outbox_messages TO @OPERATOR@;
GRANT INSERT ON outbox_attempts TO @OPERATOR@;
GRANT USAGE ON SEQUENCE outbox_attempts_id_seq TO @OPERATOR@;
GRANT INSERT, DELETE ON outbox_holds TO @OPERATOR@;
GRANT INSERT, UPDATE ON outbox_approvals TO @OPERATOR@;
GRANT USAGE ON SEQUENCE outbox_approvals_id_seq TO @OPERATOR@;
