//! Service account tokens for `serviceAccountToken` sources of projected volumes (the
//! `kube-api-access-*` volume a real API server adds to every pod).
//!
//! The kubelet asks the API server itself; an edge node cannot, so edged asks cloudcore over the
//! link with KubeEdge's message (`query <ns>/serviceaccounttoken/<sa>`, content a TokenRequest
//! bound to the pod) and cloudcore, after checking that the pod runs on this node and projects
//! exactly this token, calls the TokenRequest API. Like the kubelet, edged asks again once 80 %
//! of a token's lifetime has passed (or 24 h, whichever is first).
//!
//! A pod waits for its first token (its worker awaits it before syncing); refreshes run in the
//! background while the current token stays in use, and the pod's next sync writes the new one.
//!
//! Tokens are kept per pod in `<root>/pods/<uid>/tokens.json` (0600), beside the pod's volumes and
//! removed with them, so a restart of edgecore without the cloud still finds them: offline, the
//! last token stays in the volume until it expires, and a container restarted meanwhile gets it
//! too. Time is passed in (`now`, Unix seconds), so the refresh rules are tested without waiting.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kedge_common::{Message, Operation};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::edgehub::{CloudRequester, RequestError};

/// What identifies one token: the pod it is bound to and what its projection asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenKey {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// `None`: the API server's own audiences.
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

/// The lifetime a projection gets when it names none (as the API server defaults it).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// Tokens older than this are refreshed whatever their lifetime (as the kubelet does).
const MAX_AGE_SECONDS: i64 = 24 * 3600;
/// After a failed request, the next attempt waits this long.
const RETRY_SECONDS: i64 = 5;
/// How long a request may wait for cloudcore's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl TokenKey {
    /// The key of the token a `serviceAccountToken` projection of `pod` needs.
    pub fn for_projection(
        pod: &Pod,
        source: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
    ) -> TokenKey {
        let spec = pod.spec.as_ref();
        TokenKey {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            pod_name: pod.metadata.name.clone().unwrap_or_default(),
            pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
            audience: source.audience.clone().filter(|a| !a.is_empty()),
            expiration_seconds: source
                .expiration_seconds
                .unwrap_or(DEFAULT_EXPIRATION_SECONDS),
        }
    }
}

/// Every token `pod` projects into its volumes.
pub fn pod_token_keys(pod: &Pod) -> Vec<TokenKey> {
    let mut out = Vec::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(t) = &src.service_account_token {
                let key = TokenKey::for_projection(pod, t);
                if !out.contains(&key) {
                    out.push(key);
                }
            }
        }
    }
    out
}

/// A token and its lifetime (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub token: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

impl Token {
    pub fn valid(&self, now: i64) -> bool {
        now < self.expires_at
    }

    /// Whether to ask for a new one: 80 % of the lifetime gone, or older than 24 h.
    pub fn refresh_due(&self, now: i64) -> bool {
        let lifetime = (self.expires_at - self.issued_at).max(0);
        now >= self.issued_at + lifetime * 8 / 10 || now >= self.issued_at + MAX_AGE_SECONDS
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Link(#[from] RequestError),
    #[error("cloudcore refused the token request: {0}")]
    Refused(String),
    #[error("cloudcore's answer holds no token: {0}")]
    Malformed(String),
}

/// Where tokens come from: cloudcore over the link, or a test double.
pub trait TokenRequester: Send + Sync + 'static {
    fn request(
        &self,
        key: &TokenKey,
        now: i64,
    ) -> impl Future<Output = Result<Token, TokenError>> + Send;
}

/// The query KubeEdge's edged sends (its content is a TokenRequest bound to the pod).
pub fn request_message(key: &TokenKey) -> Message {
    let audiences = key.audience.as_ref().map(|a| vec![a.clone()]);
    Message::new(
        "edged",
        kedge_common::message::group::META,
        Operation::Query,
        format!(
            "{}/serviceaccounttoken/{}",
            key.namespace, key.service_account
        ),
        json!({
            "metadata": {"creationTimestamp": null},
            "spec": {
                "audiences": audiences,
                "expirationSeconds": key.expiration_seconds,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": key.pod_name, "uid": key.pod_uid}
            },
            "status": {"token": "", "expirationTimestamp": null}
        }),
    )
}

/// Reads cloudcore's answer: the TokenRequest with `status.token` and `status.expirationTimestamp`.
pub fn token_from_answer(answer: &Message, now: i64) -> Result<Token, TokenError> {
    if answer.route.operation == Operation::Error {
        let why = answer
            .content
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| answer.content.to_string());
        return Err(TokenError::Refused(why));
    }
    let status = &answer.content["status"];
    let token = status["token"].as_str().unwrap_or_default();
    if token.is_empty() {
        return Err(TokenError::Malformed("no status.token".into()));
    }
    let expires_at = status["expirationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_second())
        .ok_or_else(|| TokenError::Malformed("no valid status.expirationTimestamp".into()))?;
    Ok(Token {
        token: token.to_owned(),
        issued_at: now,
        expires_at,
    })
}

impl TokenRequester for CloudRequester {
    async fn request(&self, key: &TokenKey, now: i64) -> Result<Token, TokenError> {
        let answer = CloudRequester::request(self, request_message(key), REQUEST_TIMEOUT).await?;
        token_from_answer(&answer, now)
    }
}

/// One pod's tokens and what is being done about them.
#[derive(Default)]
struct PodTokens {
    /// Whether `tokens.json` was read (or found missing).
    loaded: bool,
    tokens: HashMap<TokenKey, Token>,
    in_flight: HashSet<TokenKey>,
    /// No new request before this time (after a failure).
    retry_at: HashMap<TokenKey, i64>,
}

/// What edged needs from the token manager (a trait object, so edged stays generic only over
/// its runtime and outbox).
pub trait Tokens: Send + Sync {
    /// The token for `key` if one is held that has not expired.
    fn token(&self, key: &TokenKey, now: i64) -> Option<String>;
    /// Makes `pod`'s tokens ready for its sync: reads the pod's saved tokens the first time,
    /// asks for missing or expired ones and waits for them (the pod cannot start without),
    /// and starts refreshes of those due in the background (the current one stays usable).
    /// After a failed request the next one waits a few seconds.
    fn ready<'a>(&'a self, pod: &'a Pod, now: i64) -> BoxFuture<'a, ()>;
    /// Forgets a pod that is gone (its file goes with its directory).
    fn forget(&self, uid: &str);
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The tokens of every pod.
pub struct TokenManager<Q: TokenRequester>(Arc<Inner<Q>>);

impl<Q: TokenRequester> Clone for TokenManager<Q> {
    fn clone(&self) -> Self {
        TokenManager(self.0.clone())
    }
}

struct Inner<Q: TokenRequester> {
    requester: Q,
    root: PathBuf,
    pods: Mutex<HashMap<String, PodTokens>>,
    /// Held while a `tokens.json` is written: two refreshes finishing together must not let the
    /// older snapshot land last (each writer takes its snapshot under this lock).
    saving: tokio::sync::Mutex<()>,
    /// Fetches started and not yet saved (lets tests wait for background refreshes).
    busy: std::sync::atomic::AtomicUsize,
}

fn tokens_file(root: &Path, uid: &str) -> PathBuf {
    super::volumes::pod_dir(root, uid).join("tokens.json")
}

/// What `ready` does for one key.
enum Need {
    Nothing,
    /// A valid token that is due: refreshed in the background.
    Refresh,
    /// No valid token: asked for and waited for.
    Fetch,
}

impl<Q: TokenRequester> TokenManager<Q> {
    pub fn new(requester: Q, root: PathBuf) -> Self {
        TokenManager(Arc::new(Inner {
            requester,
            root,
            pods: Mutex::new(HashMap::new()),
            saving: tokio::sync::Mutex::new(()),
            busy: std::sync::atomic::AtomicUsize::new(0),
        }))
    }
}

impl<Q: TokenRequester> Tokens for TokenManager<Q> {
    fn token(&self, key: &TokenKey, now: i64) -> Option<String> {
        self.0
            .lock()
            .get(&key.pod_uid)
            .and_then(|p| p.tokens.get(key))
            .filter(|t| t.valid(now))
            .map(|t| t.token.clone())
    }

    fn ready<'a>(&'a self, pod: &'a Pod, now: i64) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let keys = pod_token_keys(pod);
            let Some(first) = keys.first() else {
                return;
            };
            let uid = first.pod_uid.clone();
            let loaded = self.0.lock().get(&uid).is_some_and(|p| p.loaded);
            if !loaded {
                self.0.load(&uid).await;
            }
            for key in keys {
                let need = {
                    let mut all = self.0.lock();
                    let entry = all.entry(uid.clone()).or_default();
                    let waiting = entry.retry_at.get(&key).is_some_and(|at| now < *at);
                    let need = match entry.tokens.get(&key) {
                        Some(t) if t.valid(now) && !t.refresh_due(now) => Need::Nothing,
                        Some(t) if t.valid(now) => Need::Refresh,
                        _ => Need::Fetch,
                    };
                    match need {
                        Need::Nothing => Need::Nothing,
                        _ if waiting || !entry.in_flight.insert(key.clone()) => Need::Nothing,
                        n => n,
                    }
                };
                if !matches!(need, Need::Nothing) {
                    self.0
                        .busy
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                match need {
                    Need::Nothing => {}
                    Need::Fetch => self.0.fetch(key, now).await,
                    Need::Refresh => {
                        let this = self.0.clone();
                        tokio::spawn(async move { this.fetch(key, now).await });
                    }
                }
            }
        })
    }

    fn forget(&self, uid: &str) {
        self.0.lock().remove(uid);
    }
}

impl<Q: TokenRequester> Inner<Q> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodTokens>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the pod's saved tokens (a restart, maybe without the cloud).
    async fn load(&self, uid: &str) {
        let path = tokens_file(&self.root, uid);
        let saved: Vec<(TokenKey, Token)> = match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "saved service account tokens unreadable; asking for new ones");
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read saved service account tokens; asking for new ones");
                Vec::new()
            }
        };
        let mut all = self.lock();
        let entry = all.entry(uid.to_owned()).or_default();
        entry.loaded = true;
        for (k, t) in saved {
            entry.tokens.entry(k).or_insert(t);
        }
    }

    async fn fetch(&self, key: TokenKey, now: i64) {
        // `ready` counted this fetch in `busy` before starting it.
        self.fetch_and_save(key, now).await;
        self.busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    async fn fetch_and_save(&self, key: TokenKey, now: i64) {
        let result = self.requester.request(&key, now).await;
        let received = {
            let mut all = self.lock();
            let Some(entry) = all.get_mut(&key.pod_uid) else {
                return; // the pod went away meanwhile
            };
            entry.in_flight.remove(&key);
            match result {
                Ok(token) => {
                    tracing::info!(pod = %key.pod_name, namespace = %key.namespace,
                        service_account = %key.service_account, expires_at = token.expires_at,
                        "service account token received");
                    entry.retry_at.remove(&key);
                    entry.tokens.insert(key.clone(), token);
                    true
                }
                Err(e) => {
                    let kept = entry.tokens.get(&key).is_some_and(|t| t.valid(now));
                    tracing::warn!(pod = %key.pod_name, namespace = %key.namespace,
                        service_account = %key.service_account, error = %e, kept_current = kept,
                        "cannot get a service account token; will ask again");
                    entry.retry_at.insert(key.clone(), now + RETRY_SECONDS);
                    false
                }
            }
        };
        if !received {
            return;
        }
        let _saving = self.saving.lock().await;
        let Some(tokens) = self.lock().get(&key.pod_uid).map(|entry| {
            entry
                .tokens
                .iter()
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect::<Vec<_>>()
        }) else {
            return; // the pod went away meanwhile
        };
        if let Err(e) = self.save(&key.pod_uid, &tokens).await {
            tracing::warn!(pod = %key.pod_name, error = %e, "cannot save service account tokens; a restart without the cloud would have to ask again");
        }
    }

    async fn save(&self, uid: &str, tokens: &[(TokenKey, Token)]) -> std::io::Result<()> {
        let path = tokens_file(&self.root, uid);
        let bytes = serde_json::to_vec(tokens).map_err(std::io::Error::other)?;
        // Small, but still file I/O: off the async threads. 0600: these are credentials.
        tokio::task::spawn_blocking(move || kedge_common::files::write_private(&path, &bytes))
            .await
            .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "apps", "uid": "u-1"},
            "spec": {
                "serviceAccountName": "builder",
                "containers": [{"name": "c", "image": "i"}],
                "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"serviceAccountToken": {"audience": "vault", "path": "vault-token"}}
                ]}}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn keys_follow_the_projection() {
        let keys = pod_token_keys(&pod());
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].service_account, "builder");
        assert_eq!(keys[0].audience, None);
        assert_eq!(keys[0].expiration_seconds, 3607);
        assert_eq!(keys[1].audience.as_deref(), Some("vault"));
        assert_eq!(keys[1].expiration_seconds, DEFAULT_EXPIRATION_SECONDS);
    }

    #[test]
    fn the_request_is_kubeedge_s_query() {
        let keys = pod_token_keys(&pod());
        let m = request_message(&keys[0]);
        assert_eq!(m.route.operation, Operation::Query);
        assert_eq!(m.route.resource, "apps/serviceaccounttoken/builder");
        assert_eq!(m.content["spec"]["audiences"], serde_json::Value::Null);
        assert_eq!(m.content["spec"]["expirationSeconds"], 3607);
        assert_eq!(m.content["spec"]["boundObjectRef"]["uid"], "u-1");
        assert_eq!(
            request_message(&keys[1]).content["spec"]["audiences"],
            json!(["vault"])
        );
    }

    #[test]
    fn refresh_after_eighty_percent_or_a_day() {
        let t = Token {
            token: "t".into(),
            issued_at: 1000,
            expires_at: 1000 + 3600,
        };
        assert!(!t.refresh_due(1000 + 2879));
        assert!(t.refresh_due(1000 + 2880));
        assert!(t.valid(1000 + 3599));
        assert!(!t.valid(1000 + 3600));
        let long = Token {
            token: "t".into(),
            issued_at: 0,
            expires_at: 365 * 24 * 3600,
        };
        assert!(!long.refresh_due(24 * 3600 - 1));
        assert!(long.refresh_due(24 * 3600));
    }

    #[test]
    fn answers_are_read_or_refused() {
        let req = request_message(&pod_token_keys(&pod())[0]);
        let ok = req.response(
            "edgecontroller",
            json!({"status": {"token": "jwt", "expirationTimestamp": "2026-12-02T11:00:00Z"}}),
        );
        let t = token_from_answer(&ok, 5).unwrap();
        assert_eq!(t.token, "jwt");
        assert_eq!(t.issued_at, 5);
        assert_eq!(t.expires_at, 1_796_209_200);
        let mut refused = req.response("edgecontroller", json!("pod not on this node"));
        refused.route.operation = Operation::Error;
        assert_eq!(
            token_from_answer(&refused, 5),
            Err(TokenError::Refused("pod not on this node".into()))
        );
        let empty = req.response("edgecontroller", json!({"status": {}}));
        assert!(matches!(
            token_from_answer(&empty, 5),
            Err(TokenError::Malformed(_))
        ));
    }

    /// Hands out numbered tokens valid for 100 s; fails while `offline` is set.
    struct FakeCloud {
        calls: AtomicUsize,
        offline: std::sync::atomic::AtomicBool,
    }

    impl TokenRequester for Arc<FakeCloud> {
        async fn request(&self, _key: &TokenKey, now: i64) -> Result<Token, TokenError> {
            if self.offline.load(Ordering::SeqCst) {
                return Err(TokenError::Link(RequestError::Offline));
            }
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Token {
                token: format!("token-{n}"),
                issued_at: now,
                expires_at: now + 100,
            })
        }
    }

    /// What a pod worker does before each sync; background refreshes get a moment to finish.
    async fn settle<Q: TokenRequester>(m: &TokenManager<Q>, pods: &[Pod], now: i64) {
        for p in pods {
            m.ready(p, now).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while m.0.busy.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn tokens_are_fetched_refreshed_kept_offline_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Arc::new(FakeCloud {
            calls: AtomicUsize::new(0),
            offline: false.into(),
        });
        let pods = [pod()];
        let key = pod_token_keys(&pods[0])[0].clone();
        let m = TokenManager::new(cloud.clone(), dir.path().to_owned());
        settle(&m, &pods, 0).await;
        assert_eq!(m.token(&key, 0).as_deref(), Some("token-1"));
        assert_eq!(cloud.calls.load(Ordering::SeqCst), 2, "one per projection");
        // Not due yet: nothing asked.
        settle(&m, &pods, 79).await;
        assert_eq!(cloud.calls.load(Ordering::SeqCst), 2);
        // Offline at 80 %: the current token stays until it expires.
        cloud.offline.store(true, Ordering::SeqCst);
        settle(&m, &pods, 80).await;
        assert_eq!(m.token(&key, 99).as_deref(), Some("token-1"));
        assert_eq!(
            m.token(&key, 100),
            None,
            "expired tokens are not handed out"
        );
        // Back online: refreshed (after the retry delay).
        cloud.offline.store(false, Ordering::SeqCst);
        settle(&m, &pods, 86).await;
        let fresh = m.token(&key, 86).unwrap();
        assert!(fresh.starts_with("token-") && fresh != "token-1");
        // The file is private, and a new manager (edgecore restarted offline) reads it back.
        let file = tokens_file(dir.path(), "u-1");
        let mode = std::fs::metadata(&file).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        cloud.offline.store(true, Ordering::SeqCst);
        let again = TokenManager::new(cloud.clone(), dir.path().to_owned());
        settle(&again, &pods, 87).await;
        assert_eq!(again.token(&key, 87), Some(fresh));
    }
}
