//! MetaManager: the edge's memory of every object the cloud sent. For now an in-memory store
//! behind the [`store::ObjectStore`] trait; the SQLite store replaces it with the MetaManager
//! issue without changing EdgeHub.

pub mod store;
