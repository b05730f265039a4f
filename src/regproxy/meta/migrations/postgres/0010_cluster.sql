-- Leases (regproxy.cluster): work the whole cluster does once at a time, e.g. a blob fill
-- ("blob:<digest>") or a tag revalidation ("tag:<repo>:<tag>"). Expired rows are taken over.
CREATE TABLE leases (
    key     TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    host    TEXT NOT NULL,
    url     TEXT NOT NULL,
    spool   TEXT NOT NULL,
    size    BIGINT,
    started DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);

-- Failed logins, counted for every replica (auth/ratelimit.py): per key, the window's start
-- and its failures. Rows whose window ended are pruned as new failures come in.
CREATE TABLE login_failures (
    key      TEXT PRIMARY KEY,
    started  DOUBLE PRECISION NOT NULL,
    failures INTEGER NOT NULL
);
CREATE INDEX login_failures_by_start ON login_failures (started);
