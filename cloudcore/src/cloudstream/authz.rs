//! Who may use an edge node's kubelet API: what the kubelet asks the API server in webhook mode
//! (`--authorization-mode=Webhook`), a SubjectAccessReview for the caller on `nodes/<sub>` of that
//! node. The API server's own kubelet client is allowed by the cluster's RBAC
//! (`system:kubelet-api-admin`); a node's certificate, also signed by the client CA, is not.
//!
//! Decisions are cached as the kubelet caches them (allowed 5 minutes, denied 30 seconds), so a
//! `kubectl logs` costs the API server one review, not one per request.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// What a request wants, as a SubjectAccessReview asks it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestAttributes {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: String,
    pub node: String,
    pub subresource: String,
}

pub type Decision<'a> = Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;

pub trait Authorizer: Send + Sync + 'static {
    fn authorize<'a>(&'a self, attrs: &'a RequestAttributes) -> Decision<'a>;
}

/// Anyone with a certificate from the client CA (`authorization: AlwaysAllow`; the kubelet's
/// mode of the same name). Only for clusters whose client CA signs nothing but the API server's
/// kubelet client certificate.
pub struct AlwaysAllow;

impl Authorizer for AlwaysAllow {
    fn authorize<'a>(&'a self, _: &'a RequestAttributes) -> Decision<'a> {
        Box::pin(async { Ok(true) })
    }
}

const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);
const CACHE_LIMIT: usize = 4096;

/// Recent decisions, kept as long as the kubelet keeps them. Time is passed in.
#[derive(Default)]
pub struct DecisionCache {
    entries: Mutex<HashMap<RequestAttributes, (bool, Instant)>>,
}

fn fresh(allowed: bool, at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < if allowed { ALLOWED_TTL } else { DENIED_TTL }
}

impl DecisionCache {
    pub fn get(&self, attrs: &RequestAttributes, now: Instant) -> Option<bool> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(attrs)
            .filter(|(allowed, at)| fresh(*allowed, *at, now))
            .map(|(allowed, _)| *allowed)
    }

    pub fn put(&self, attrs: &RequestAttributes, allowed: bool, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CACHE_LIMIT {
            entries.retain(|_, (a, at)| fresh(*a, *at, now));
            if entries.len() >= CACHE_LIMIT {
                entries.clear();
            }
        }
        entries.insert(attrs.clone(), (allowed, now));
    }
}

/// Asks the API server (`authorization: Webhook`, the default).
pub struct SubjectAccessReviewer {
    client: kube::Client,
    cache: DecisionCache,
}

impl SubjectAccessReviewer {
    pub fn new(client: kube::Client) -> Self {
        SubjectAccessReviewer {
            client,
            cache: DecisionCache::default(),
        }
    }
}

impl Authorizer for SubjectAccessReviewer {
    fn authorize<'a>(&'a self, attrs: &'a RequestAttributes) -> Decision<'a> {
        Box::pin(async move {
            if let Some(allowed) = self.cache.get(attrs, Instant::now()) {
                return Ok(allowed);
            }
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(attrs.user.clone()),
                    groups: Some(attrs.groups.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(attrs.verb.clone()),
                        resource: Some("nodes".into()),
                        subresource: Some(attrs.subresource.clone()),
                        name: Some(attrs.node.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("SubjectAccessReview failed: {e}"))?;
            let allowed = answer.status.is_some_and(|s| s.allowed);
            self.cache.put(attrs, allowed, Instant::now());
            Ok(allowed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_forgets_denials_sooner() {
        let attrs = RequestAttributes {
            user: "u".into(),
            groups: vec![],
            verb: "get".into(),
            node: "n".into(),
            subresource: "proxy".into(),
        };
        let cache = DecisionCache::default();
        let t0 = Instant::now();
        assert_eq!(cache.get(&attrs, t0), None);
        cache.put(&attrs, false, t0);
        assert_eq!(cache.get(&attrs, t0 + Duration::from_secs(29)), Some(false));
        assert_eq!(cache.get(&attrs, t0 + Duration::from_secs(31)), None);
        cache.put(&attrs, true, t0);
        assert_eq!(cache.get(&attrs, t0 + Duration::from_secs(299)), Some(true));
        assert_eq!(cache.get(&attrs, t0 + Duration::from_secs(301)), None);
        let other = RequestAttributes {
            node: "m".into(),
            ..attrs.clone()
        };
        assert_eq!(cache.get(&other, t0), None);
    }
}
