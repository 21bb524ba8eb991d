-- Every object the cloud sent this node, latest version per (kind, namespace, name).
-- A delete leaves a tombstone (deleted = 1) so that an older message arriving late cannot
-- resurrect the object. `seq` is the local change sequence: the MetaServer's resourceVersion
-- and the change feed's position. (A rowid table: rows hold whole objects, too large for
-- WITHOUT ROWID to pay off.)
CREATE TABLE objects (
    kind             TEXT    NOT NULL,
    namespace        TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    uid              TEXT    NOT NULL DEFAULT '',
    resource_version TEXT    NOT NULL,
    deleted          INTEGER NOT NULL DEFAULT 0,
    content          TEXT    NOT NULL,
    seq              INTEGER NOT NULL,
    UNIQUE (kind, namespace, name)
);

-- Reports waiting for the cloud: the latest per key, sent in `seq` order.
CREATE TABLE outbox (
    key     TEXT    PRIMARY KEY NOT NULL,
    seq     INTEGER NOT NULL UNIQUE,
    message TEXT    NOT NULL
);
