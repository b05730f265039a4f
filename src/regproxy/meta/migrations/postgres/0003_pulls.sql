-- When each manifest was last pulled, by tag or by digest (NULL: not since it was stored), as
-- SQLite's 0003_pulls.sql. Written in batches (lifecycle/pulls.py), at most once per manifest
-- per flush period. Retention keeps tags pulled within a window; cache eviction drops least
-- recently pulled images first.
ALTER TABLE manifests ADD COLUMN last_pulled DOUBLE PRECISION;
-- Retention selects each repository's tags by push time.
CREATE INDEX tags_by_push ON tags (repo, updated);
-- Eviction lists each upstream's images by last use without reading manifest bytes.
CREATE INDEX manifests_by_use ON manifests (repo, last_pulled, created, digest);
