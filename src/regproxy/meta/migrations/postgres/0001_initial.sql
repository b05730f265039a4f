-- The same tables as SQLite's 0001_initial.sql, in PostgreSQL's types.
-- Names, tags and digests compare bytewise (COLLATE "C"), whatever the database's locale, so
-- tag lists and the catalog come back in the order the distribution spec expects.
-- Times are DOUBLE PRECISION: a float8 round-trips a Python float exactly, which the uploads'
-- compare-and-set on "updated" relies on.

-- Blobs are stored once per digest; a repository sees a blob only through repository_blobs.
CREATE TABLE blobs (
    digest      TEXT COLLATE "C" PRIMARY KEY,
    size        BIGINT NOT NULL,
    storage_key TEXT NOT NULL,
    created     DOUBLE PRECISION NOT NULL
);

CREATE TABLE repository_blobs (
    repo   TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX repository_blobs_by_digest ON repository_blobs (digest);

-- Manifests are small and hot: their bytes live here, so a GET is one indexed query.
CREATE TABLE manifests (
    repo          TEXT COLLATE "C" NOT NULL,
    digest        TEXT COLLATE "C" NOT NULL,
    media_type    TEXT NOT NULL,
    content       BYTEA NOT NULL,
    subject       TEXT COLLATE "C",
    artifact_type TEXT,
    created       DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repo, subject) WHERE subject IS NOT NULL;

-- What each manifest references: blobs (config, layers) and child manifests (indexes).
CREATE TABLE manifest_references (
    repo        TEXT COLLATE "C" NOT NULL,
    digest      TEXT COLLATE "C" NOT NULL,
    child       TEXT COLLATE "C" NOT NULL,
    is_manifest BOOLEAN NOT NULL,
    PRIMARY KEY (repo, digest, child)
);
CREATE INDEX manifest_references_by_child ON manifest_references (child);

CREATE TABLE tags (
    repo    TEXT COLLATE "C" NOT NULL,
    tag     TEXT COLLATE "C" NOT NULL,
    digest  TEXT COLLATE "C" NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo, tag)
);
CREATE INDEX tags_by_digest ON tags (repo, digest);

-- Uploads in progress survive restarts and may continue in another process or replica.
CREATE TABLE uploads (
    id        TEXT COLLATE "C" PRIMARY KEY,
    repo      TEXT COLLATE "C" NOT NULL,
    algorithm TEXT NOT NULL,
    "offset"  BIGINT NOT NULL,
    state     TEXT NOT NULL,
    started   DOUBLE PRECISION NOT NULL,
    updated   DOUBLE PRECISION NOT NULL
);
CREATE INDEX uploads_by_updated ON uploads (updated);
