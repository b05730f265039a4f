-- Leases (regproxy.cluster): work the whole cluster does once at a time, e.g. a blob fill
-- ("blob:<digest>") or a tag revalidation ("tag:<repo>:<tag>"). Expired rows are taken over.
CREATE TABLE leases (
    key     TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    host    TEXT NOT NULL,
    url     TEXT NOT NULL,
    spool   TEXT NOT NULL,
    size    INTEGER,
    started REAL NOT NULL,
    expires REAL NOT NULL
);
