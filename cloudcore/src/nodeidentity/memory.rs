//! Test support: the ownership rules on records kept in memory, for CloudHub without a cluster
//! (unit tests, the link tests and hub benchmarks of `tests/e2e`). Built only for tests and with
//! the `test-support` feature; cloudcore itself keeps records in the cluster.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use super::{
    BoxFuture, Identity, NodeIdentities, Record, Refusal, may_claim, may_connect, rotated,
};

fn record_in(records: &HashMap<String, Identity>, node: &str) -> Record {
    records
        .get(node)
        .cloned()
        .map_or(Record::NoNode, Record::Recorded)
}

#[derive(Default)]
pub struct MemoryIdentities {
    records: Mutex<HashMap<String, Identity>>,
    tokens: Mutex<HashMap<String, u32>>,
}

impl MemoryIdentities {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Identity>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, node: &str) -> Record {
        record_in(&self.records(), node)
    }

    /// Records `key` as `node`'s owner, as a join would (for certificates a test signs itself).
    pub fn own(&self, node: &str, key: &str) {
        self.records().insert(
            node.to_owned(),
            Identity::Owned {
                keys: vec![key.to_owned()],
            },
        );
    }

    /// Sets a record as `cloudcore node revoke|reset` or deleting the Node (`None`) would.
    pub fn set(&self, node: &str, identity: Option<Identity>) {
        match identity {
            Some(i) => self.records().insert(node.to_owned(), i),
            None => self.records().remove(node),
        };
    }

    pub fn get(&self, node: &str) -> Option<Identity> {
        self.records().get(node).cloned()
    }

    /// A token id with `uses` uses.
    pub fn add_token(&self, jti: &str, uses: u32) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(jti.to_owned(), uses);
    }
}

impl NodeIdentities for MemoryIdentities {
    fn admit<'a>(&'a self, node: &'a str, key: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            if let Some(keys) = may_connect(node, key, &self.record(node))? {
                self.records()
                    .insert(node.to_owned(), Identity::Owned { keys });
            }
            Ok(())
        })
    }

    fn claim<'a>(
        &'a self,
        node: &'a str,
        key: &'a str,
        _from: IpAddr,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let mut records = self.records();
            let record = record_in(&records, node);
            may_claim(node, &record)?;
            records.insert(
                node.to_owned(),
                Identity::Owned {
                    keys: vec![key.to_owned()],
                },
            );
            Ok(())
        })
    }

    fn rotate<'a>(
        &'a self,
        node: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let mut records = self.records();
            let record = record_in(&records, node);
            let next = rotated(node, old, new, &record)?;
            records.insert(node.to_owned(), next);
            Ok(())
        })
    }

    fn use_token<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            match tokens.get_mut(jti) {
                Some(0) => Err(Refusal::Denied("the token is used up".into())),
                Some(n) => {
                    *n -= 1;
                    Ok(())
                }
                None => Err(Refusal::Denied(
                    "the token's use count is gone (deleted); issue a new token".into(),
                )),
            }
        })
    }
}
