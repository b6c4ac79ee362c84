-- recrypt-outbox: the database accounts, MariaDB 10.6+ (10.4+ works) and MySQL 8.
-- Printed by `outbox db roles --print --backend mariadb`, which fills in the names.
--
-- Step 1 of 2. Run as root (or an account with CREATE USER and GRANT OPTION), before the
-- first `outbox db upgrade` and again before each later one:
--     mariadb -e 'source roles.sql'
-- Step 2 is the grants script (`outbox db roles --print --grants`), after `outbox db upgrade`.
-- Both are idempotent.
--
-- The accounts:
--   @OWNER@     owns the outbox tables; `outbox db upgrade` runs as it, and nothing else.
--   @DAEMON@    `outbox run` and `outbox check`: reads and moves rows; no DDL, no new rows.
--   @WRITER@    your application (outbox.enqueue, `outbox enqueue`): inserts rows, reads them;
--               cannot update or delete one.
--   @READER@    the CLI's read commands (status, list, show, check, db current).
--   @OPERATOR@  the reader plus `outbox requeue` and `outbox cancel`.
-- They are created locked, without a password. Unlock each one you use with a password:
--     ALTER USER '@DAEMON@'@'@HOST@' IDENTIFIED BY '…' ACCOUNT UNLOCK;

CREATE USER IF NOT EXISTS '@OWNER@'@'@HOST@' ACCOUNT LOCK;
CREATE USER IF NOT EXISTS '@DAEMON@'@'@HOST@' ACCOUNT LOCK;
CREATE USER IF NOT EXISTS '@WRITER@'@'@HOST@' ACCOUNT LOCK;
CREATE USER IF NOT EXISTS '@READER@'@'@HOST@' ACCOUNT LOCK;
CREATE USER IF NOT EXISTS '@OPERATOR@'@'@HOST@' ACCOUNT LOCK;

-- The owner may create, alter and drop the outbox tables and nothing else in the database
-- (MariaDB takes grants on tables that do not exist yet). A new version that adds a table
-- adds it here: run this script again before its `outbox db upgrade`.
GRANT ALL PRIVILEGES ON `@DATABASE@`.`alembic_version` TO '@OWNER@'@'@HOST@';
GRANT ALL PRIVILEGES ON `@DATABASE@`.`outbox_messages` TO '@OWNER@'@'@HOST@';
GRANT ALL PRIVILEGES ON `@DATABASE@`.`outbox_attempts` TO '@OWNER@'@'@HOST@';
GRANT ALL PRIVILEGES ON `@DATABASE@`.`outbox_workers` TO '@OWNER@'@'@HOST@';
GRANT ALL PRIVILEGES ON `@DATABASE@`.`outbox_tombstones` TO '@OWNER@'@'@HOST@';
GRANT ALL PRIVILEGES ON `@DATABASE@`.`outbox_lanes` TO '@OWNER@'@'@HOST@';
GRANT ALL PRIVILEGES ON `@DATABASE@`.`outbox_holds` TO '@OWNER@'@'@HOST@';
GRANT ALL PRIVILEGES ON `@DATABASE@`.`outbox_approvals` TO '@OWNER@'@'@HOST@';
