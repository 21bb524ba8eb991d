//! MetaManager: the edge's memory of every object the cloud sent. [`sqlite::SqliteStore`] keeps
//! it in SQLite (acks only after commit) with a change feed; [`metaserver`] serves it as a
//! read-only Kubernetes API on 127.0.0.1. [`store::MemoryStore`] has the same semantics without
//! durability, for simulations of many nodes in one process.

pub mod metaserver;
pub mod sqlite;
pub mod store;
