-- The inventory (every live object's identity and version, read on every connect) comes from
-- this index alone, without reading the objects' content pages.
CREATE INDEX objects_inventory ON objects (deleted, kind, namespace, name, uid, resource_version);
