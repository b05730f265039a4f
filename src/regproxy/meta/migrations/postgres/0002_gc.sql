-- Garbage collection (as SQLite's 0002_gc.sql): when a blob was last linked (pushed, mounted,
-- or confirmed by a HEAD/GET) in each repository. A link younger than gc.grace keeps its blob
-- alive; an upgrade gives every existing link one full grace from the moment of the migration.
ALTER TABLE repository_blobs ADD COLUMN linked DOUBLE PRECISION NOT NULL DEFAULT 0;
UPDATE repository_blobs SET linked = extract(epoch FROM now());
