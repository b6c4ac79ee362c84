-- recrypt-outbox: the database roles, PostgreSQL (12 or newer; written for 15).
-- Printed by `outbox db roles --print --backend postgresql`, which fills in the names.
--
-- Step 1 of 2. Run as a superuser (or a role with CREATEROLE) connected to the outbox
-- database, before the first `outbox db upgrade` and again before each later one:
--     psql -v ON_ERROR_STOP=1 -d @DATABASE@ -f roles.sql
-- Step 2 is the grants script (`outbox db roles --print --grants`), after `outbox db upgrade`.
-- Both are idempotent.
--
-- The roles:
--   @OWNER@     owns the outbox tables; `outbox db upgrade` runs as it, and nothing else.
--   @DAEMON@    `outbox run` and `outbox check`: reads and moves rows; no DDL, no new rows.
--   @WRITER@    your application (outbox.enqueue, `outbox enqueue`): inserts rows, reads them;
--               cannot update or delete one.
--   @READER@    the CLI's read commands (status, list, show, check, db current).
--   @OPERATOR@  the reader plus `outbox requeue` and `outbox cancel`.
-- They are LOGIN roles without a password: give each one you use a password
-- (ALTER ROLE … PASSWORD '…') or map it in pg_hba.conf / pg_ident.conf.

DO $$
DECLARE
  role_name text;
BEGIN
  FOREACH role_name IN ARRAY ARRAY['@OWNER@', '@DAEMON@', '@WRITER@', '@READER@', '@OPERATOR@']
  LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
      EXECUTE format('CREATE ROLE %I LOGIN', role_name);
    END IF;
  END LOOP;
END
$$;

GRANT CONNECT ON DATABASE @DATABASE@ TO @OWNER@, @DAEMON@, @WRITER@, @READER@, @OPERATOR@;

-- Since PostgreSQL 15 only the schema's owner may create in schema public: without this
-- grant `outbox db upgrade` fails with "permission denied for schema public".
GRANT USAGE, CREATE ON SCHEMA public TO @OWNER@;
GRANT USAGE ON SCHEMA public TO @DAEMON@, @WRITER@, @READER@, @OPERATOR@;
