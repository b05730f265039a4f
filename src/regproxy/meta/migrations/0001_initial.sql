-- Blobs are stored once per digest; a repository sees a blob only through repository_blobs.
CREATE TABLE blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    storage_key TEXT NOT NULL,
    created     REAL NOT NULL
);

CREATE TABLE repository_blobs (
    repo   TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (repo, digest)
) WITHOUT ROWID;
CREATE INDEX repository_blobs_by_digest ON repository_blobs (digest);

-- Manifests are small and hot: their bytes live here, so a GET is one indexed query.
CREATE TABLE manifests (
    repo          TEXT NOT NULL,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    content       BLOB NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    created       REAL NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repo, subject) WHERE subject IS NOT NULL;

-- What each manifest references: blobs (config, layers) and child manifests (indexes).
CREATE TABLE manifest_references (
    repo        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    child       TEXT NOT NULL,
    is_manifest INTEGER NOT NULL,
    PRIMARY KEY (repo, digest, child)
) WITHOUT ROWID;
CREATE INDEX manifest_references_by_child ON manifest_references (child);

CREATE TABLE tags (
    repo    TEXT NOT NULL,
    tag     TEXT NOT NULL,
    digest  TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (repo, tag)
) WITHOUT ROWID;
CREATE INDEX tags_by_digest ON tags (repo, digest);

-- Uploads in progress survive restarts and may continue in another process.
CREATE TABLE uploads (
    id        TEXT PRIMARY KEY,
    repo      TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    "offset"  INTEGER NOT NULL,
    state     TEXT NOT NULL,
    started   REAL NOT NULL,
    updated   REAL NOT NULL
);
CREATE INDEX uploads_by_updated ON uploads (updated);
