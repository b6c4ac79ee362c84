-- recrypt-outbox: what each account may do with the outbox tables, MariaDB / MySQL 8.
-- Printed by `outbox db roles --print --grants --backend mariadb`.
--
-- Step 2 of 2. Run as root after every `outbox db upgrade` (a new version may add a table):
--     mariadb -e 'source grants.sql'
-- Idempotent. Grants are per table, so a migration that adds a column needs nothing new.

-- Every account reads the schema revision: the daemon and the CLI refuse a schema not at
-- head. Only @OWNER@ may change it.
GRANT SELECT ON `@DATABASE@`.`alembic_version` TO '@DAEMON@'@'@HOST@', '@WRITER@'@'@HOST@', '@READER@'@'@HOST@', '@OPERATOR@'@'@HOST@';

-- The daemon: claims, records and purges rows; their history; its heartbeats; tombstones.
GRANT SELECT, UPDATE, DELETE ON `@DATABASE@`.`outbox_messages` TO '@DAEMON@'@'@HOST@';
GRANT SELECT, INSERT, DELETE ON `@DATABASE@`.`outbox_attempts` TO '@DAEMON@'@'@HOST@';
GRANT SELECT, INSERT, UPDATE, DELETE ON `@DATABASE@`.`outbox_workers` TO '@DAEMON@'@'@HOST@';  -- DELETE: old worker rows
GRANT SELECT, INSERT, DELETE ON `@DATABASE@`.`outbox_tombstones` TO '@DAEMON@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_lanes` TO '@DAEMON@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_holds` TO '@DAEMON@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_approvals` TO '@DAEMON@'@'@HOST@';

-- The writer: inserts rows and reads them (enqueue refuses a key already used). It reads the
-- tombstones (a key spent by a purged row is refused) and takes a lane's lock row
-- (INSERT … ON DUPLICATE KEY UPDATE); outbox_lanes holds lane names only.
GRANT SELECT, INSERT ON `@DATABASE@`.`outbox_messages` TO '@WRITER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_tombstones` TO '@WRITER@'@'@HOST@';
GRANT SELECT, INSERT, UPDATE ON `@DATABASE@`.`outbox_lanes` TO '@WRITER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_holds` TO '@WRITER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_approvals` TO '@WRITER@'@'@HOST@';

-- The reader: everything, read-only.
GRANT SELECT ON `@DATABASE@`.`outbox_messages` TO '@READER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_attempts` TO '@READER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_workers` TO '@READER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_tombstones` TO '@READER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_lanes` TO '@READER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_holds` TO '@READER@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_approvals` TO '@READER@'@'@HOST@';

-- The operator: the reader's rights, plus requeue/cancel (a row's state, a history line),
-- hold/release (a hold's row) and dual control (a request, its decision).
GRANT SELECT, UPDATE ON `@DATABASE@`.`outbox_messages` TO '@OPERATOR@'@'@HOST@';
GRANT SELECT, INSERT ON `@DATABASE@`.`outbox_attempts` TO '@OPERATOR@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_workers` TO '@OPERATOR@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_tombstones` TO '@OPERATOR@'@'@HOST@';
GRANT SELECT ON `@DATABASE@`.`outbox_lanes` TO '@OPERATOR@'@'@HOST@';
GRANT SELECT, INSERT, DELETE ON `@DATABASE@`.`outbox_holds` TO '@OPERATOR@'@'@HOST@';
GRANT SELECT, INSERT, UPDATE ON `@DATABASE@`.`outbox_approvals` TO '@OPERATOR@'@'@HOST@';
