//! Who may be which node: ownership of node names, revocation, and counted join tokens.
//!
//! A certificate from our CA names a node, but a join token lets anyone obtain one for any
//! name, and a certificate stays valid until it expires. So a name also needs an owner: the
//! first join of a name records the **key id** of the certificate it got (SHA-256 of the public
//! key, [`kedge_common::pki::cert_key_id`]) on the Node itself, as the annotation
//! [`ANNOTATION`]. From then on
//!
//! - a connection or a certificate rotation for the name must present a certificate whose key
//!   the record lists (the TLS handshake proves the caller holds the private key);
//! - a join token alone cannot claim the name again: the record must first be released on
//!   purpose (`cloudcore node reset`), or the Node deleted;
//! - `cloudcore node revoke` marks the record revoked, and deleting the Node removes it: either
//!   way the node's certificates stop working, its open session is closed, and cloudcore never
//!   re-creates the Node for them.
//!
//! Keeping the record on the Node (rather than in a Secret per node) ties its life to the Node's
//! — deleting the Node is how Kubernetes users retire a machine — costs no extra watch (the
//! edgecontroller already watches edge Nodes) and is shared by every cloudcore replica. The
//! annotation is only writable by whoever may edit Nodes, which already means owning the
//! cluster; edges cannot set it (their Node updates have it stripped).
//!
//! The rules are pure functions on [`Identity`], so they are tested without a cluster; the
//! cluster-backed store is [`cluster::ClusterIdentities`].

pub mod cluster;
#[cfg(any(test, feature = "test-support"))]
pub mod memory;
pub mod ratelimit;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// The Node annotation holding a node's [`Identity`] (JSON).
pub const ANNOTATION: &str = "kedge.io/node-identity";

/// The ownership record of a node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum Identity {
    /// Joined: connections and rotations with one of `keys` (newest first) are accepted.
    /// Entered at a join (one key); a rotation makes it `[new, the key it came from]`, in case
    /// the answer never reaches the node; the first connection with `new` drops the old one.
    Owned { keys: Vec<String> },
    /// `cloudcore node revoke`: nothing is accepted and a join token cannot claim the name
    /// until `cloudcore node reset`.
    Revoked {
        #[serde(default)]
        reason: String,
    },
    /// `cloudcore node reset`: no certificate is accepted; the next join claims the name.
    Released,
}

/// Why a request for a node was refused; the variant picks the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 403: the caller is not (or no longer) this node.
    #[error("{0}")]
    Denied(String),
    /// 409: the name belongs to someone else.
    #[error("{0}")]
    Owned(String),
    /// 503: the record cannot be read or written right now; try again.
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refusal::Denied(_) => http::StatusCode::FORBIDDEN,
            Refusal::Owned(_) => http::StatusCode::CONFLICT,
            Refusal::Unavailable(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What a Node says about its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// No Node of that name.
    NoNode,
    /// A Node without our annotation: not joined through kedge (a cloud node, one made by
    /// hand, or one joined before ownership records existed).
    Unrecorded,
    /// The annotation is not an [`Identity`]; refused until reset, never guessed at.
    Unreadable(String),
    Recorded(Identity),
}

impl Record {
    /// Reads the record from a Node's annotations (`None`: no Node).
    pub fn of(annotations: Option<Option<&std::collections::BTreeMap<String, String>>>) -> Record {
        match annotations {
            None => Record::NoNode,
            Some(a) => match a.and_then(|a| a.get(ANNOTATION)) {
                None => Record::Unrecorded,
                Some(v) => match serde_json::from_str(v) {
                    Ok(i) => Record::Recorded(i),
                    Err(e) => Record::Unreadable(e.to_string()),
                },
            },
        }
    }

    pub fn of_node(node: Option<&k8s_openapi::api::core::v1::Node>) -> Record {
        Record::of(node.map(|n| n.metadata.annotations.as_ref()))
    }

    /// The keys a connection may use now (empty: none).
    pub fn accepted_keys(&self) -> &[String] {
        match self {
            Record::Recorded(Identity::Owned { keys }) => keys,
            _ => &[],
        }
    }
}

/// What a join may do with a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Create the Node, owned by the joining key.
    Create,
    /// Take over the existing Node (its record was released).
    TakeOver,
}

/// Whether a join token may claim `node` given its record.
pub fn may_claim(node: &str, record: &Record) -> Result<Claim, Refusal> {
    match record {
        Record::NoNode => Ok(Claim::Create),
        Record::Recorded(Identity::Released) => Ok(Claim::TakeOver),
        Record::Recorded(Identity::Owned { .. }) => Err(Refusal::Owned(format!(
            "node {node} is already owned by the machine that joined it; a join token cannot \
             claim it again (to re-provision it: `cloudcore node reset {node}`, or delete the Node)"
        ))),
        Record::Recorded(Identity::Revoked { .. }) => Err(Refusal::Owned(format!(
            "node {node} is revoked; `cloudcore node reset {node}` (or deleting the Node) allows a new join"
        ))),
        Record::Unrecorded => Err(Refusal::Owned(format!(
            "a Node named {node} exists and was not joined through kedge; to hand it to an edge \
             machine run `cloudcore node reset {node}`"
        ))),
        Record::Unreadable(e) => Err(Refusal::Owned(format!(
            "node {node}'s annotation {ANNOTATION} is unreadable ({e}); `cloudcore node reset {node}` replaces it"
        ))),
    }
}

/// Whether a certificate with key `key` may act as `node`. `Ok(Some(keys))`: yes, and the
/// record should shrink to `keys` (the node uses a newer key than some it may still rotate from).
pub fn may_connect(node: &str, key: &str, record: &Record) -> Result<Option<Vec<String>>, Refusal> {
    match record {
        Record::Recorded(Identity::Owned { keys }) => match keys.iter().position(|k| k == key) {
            Some(i) if i + 1 < keys.len() => Ok(Some(keys[..=i].to_vec())),
            Some(_) => Ok(None),
            None => Err(Refusal::Denied(format!(
                "this certificate's key is not (or no longer) node {node}'s"
            ))),
        },
        Record::NoNode => Err(Refusal::Denied(format!(
            "node {node} does not exist (deleted?); its certificates are no longer accepted"
        ))),
        Record::Recorded(Identity::Revoked { .. }) => Err(Refusal::Denied(format!(
            "node {node}'s certificates are revoked"
        ))),
        Record::Recorded(Identity::Released) => Err(Refusal::Denied(format!(
            "node {node} was reset; it must join again with a token"
        ))),
        Record::Unrecorded => Err(Refusal::Denied(format!(
            "node {node} has no ownership record; run `cloudcore node reset {node}` and join it again"
        ))),
        Record::Unreadable(e) => Err(Refusal::Denied(format!(
            "node {node}'s annotation {ANNOTATION} is unreadable: {e}"
        ))),
    }
}

/// The record after a rotation from `old` to `new`, if `old` may rotate.
pub fn rotated(node: &str, old: &str, new: &str, record: &Record) -> Result<Identity, Refusal> {
    may_connect(node, old, record)?;
    // The caller holds `old`: keys issued after it never reached the node (the answer was
    // lost), keys before it are retired.
    let mut keys = vec![new.to_owned()];
    if old != new {
        keys.push(old.to_owned());
    }
    Ok(Identity::Owned { keys })
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where ownership records and token uses are kept: the cluster in cloudcore
/// ([`cluster::ClusterIdentities`]); CloudHub and the bootstrap endpoint only see this trait.
pub trait NodeIdentities: Send + Sync + 'static {
    /// May a connection whose certificate has key `key` be node `node`?
    fn admit<'a>(&'a self, node: &'a str, key: &'a str) -> BoxFuture<'a, Result<(), Refusal>>;
    /// A join: records `key` as the owner of `node` if a token may claim it. Atomic: of two
    /// joins racing for a name, one wins.
    fn claim<'a>(
        &'a self,
        node: &'a str,
        key: &'a str,
        from: IpAddr,
    ) -> BoxFuture<'a, Result<(), Refusal>>;
    /// A rotation from key `old` (the caller's certificate) to `new`.
    fn rotate<'a>(
        &'a self,
        node: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> BoxFuture<'a, Result<(), Refusal>>;
    /// Takes one use of a token issued with `--uses` (its id `jti`); refused when none is left.
    fn use_token<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<(), Refusal>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(keys: &[&str]) -> Record {
        Record::Recorded(Identity::Owned {
            keys: keys.iter().map(|k| k.to_string()).collect(),
        })
    }

    #[test]
    fn a_token_claims_only_names_nobody_owns() {
        assert_eq!(may_claim("n", &Record::NoNode), Ok(Claim::Create));
        assert_eq!(
            may_claim("n", &Record::Recorded(Identity::Released)),
            Ok(Claim::TakeOver)
        );
        for r in [
            owned(&["a"]),
            Record::Recorded(Identity::Revoked { reason: "".into() }),
            Record::Unrecorded,
            Record::Unreadable("x".into()),
        ] {
            let e = may_claim("n", &r).unwrap_err();
            assert_eq!(e.status(), http::StatusCode::CONFLICT, "{r:?}");
            assert!(e.to_string().contains("cloudcore node reset n"), "{e}");
        }
    }

    #[test]
    fn only_recorded_keys_connect_and_newer_keys_retire_older_ones() {
        assert_eq!(may_connect("n", "a", &owned(&["a"])), Ok(None));
        assert_eq!(
            may_connect("n", "b", &owned(&["b", "a"])),
            Ok(Some(vec!["b".into()]))
        );
        assert_eq!(may_connect("n", "a", &owned(&["b", "a"])), Ok(None));
        for r in [
            owned(&["a"]),
            Record::NoNode,
            Record::Recorded(Identity::Revoked { reason: "".into() }),
            Record::Recorded(Identity::Released),
            Record::Unrecorded,
            Record::Unreadable("x".into()),
        ] {
            let e = may_connect("n", "z", &r).unwrap_err();
            assert_eq!(e.status(), http::StatusCode::FORBIDDEN, "{r:?}");
        }
    }

    #[test]
    fn rotation_keeps_the_key_it_came_from_until_the_new_one_is_seen() {
        let r = rotated("n", "a", "b", &owned(&["a"])).unwrap();
        assert_eq!(
            r,
            Identity::Owned {
                keys: vec!["b".into(), "a".into()]
            }
        );
        // The answer was lost: the node rotates again from `a`; `b` is dropped.
        let r2 = rotated("n", "a", "c", &Record::Recorded(r.clone())).unwrap();
        assert_eq!(
            r2,
            Identity::Owned {
                keys: vec!["c".into(), "a".into()]
            }
        );
        // From `b` (it arrived and is in use): `a` is gone for good.
        let r3 = rotated("n", "b", "d", &Record::Recorded(r)).unwrap();
        assert_eq!(
            r3,
            Identity::Owned {
                keys: vec!["d".into(), "b".into()]
            }
        );
        assert!(rotated("n", "x", "y", &owned(&["a"])).is_err());
        assert!(
            rotated(
                "n",
                "a",
                "b",
                &Record::Recorded(Identity::Revoked { reason: "".into() })
            )
            .is_err()
        );
    }

    #[test]
    fn records_read_from_annotations() {
        let mut a = std::collections::BTreeMap::new();
        assert_eq!(Record::of(None), Record::NoNode);
        assert_eq!(Record::of(Some(None)), Record::Unrecorded);
        assert_eq!(Record::of(Some(Some(&a))), Record::Unrecorded);
        a.insert(
            ANNOTATION.to_owned(),
            r#"{"state":"owned","keys":["k"]}"#.into(),
        );
        assert_eq!(Record::of(Some(Some(&a))), owned(&["k"]));
        a.insert(ANNOTATION.to_owned(), r#"{"state":"released"}"#.into());
        assert_eq!(
            Record::of(Some(Some(&a))),
            Record::Recorded(Identity::Released)
        );
        a.insert(ANNOTATION.to_owned(), "{nonsense".into());
        assert!(matches!(Record::of(Some(Some(&a))), Record::Unreadable(_)));
        let json = serde_json::to_string(&Identity::Revoked {
            reason: "stolen".into(),
        })
        .unwrap();
        assert_eq!(json, r#"{"state":"revoked","reason":"stolen"}"#);
    }
}
