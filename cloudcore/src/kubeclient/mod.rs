//! Building the Kubernetes client from `kubeAPIConfig`: a kubeconfig file, or in-cluster /
//! `$KUBECONFIG` inference when none is given; its requests held to `qps`/`burst` and counted
//! (`requests`).

pub mod requests;

use std::sync::Arc;

use kube::config::{KubeConfigOptions, Kubeconfig};

pub use requests::ApiRequests;
use requests::{ApiRequestLayer, RateLimitError, TokenBucket};

use crate::config::KubeApiConfig;

#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot infer a Kubernetes configuration (no kubeconfig, not in a cluster): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("kubeAPIConfig.master `{0}` is not a valid URL")]
    BadMaster(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
}

/// A client whose request counts nobody reads (the one-shot CLI commands).
pub async fn client(cfg: &KubeApiConfig) -> Result<kube::Client, KubeClientError> {
    counted_client(cfg, Arc::new(ApiRequests::default())).await
}

/// The client, its requests counted in `counts`.
pub async fn counted_client(
    cfg: &KubeApiConfig,
    counts: Arc<ApiRequests>,
) -> Result<kube::Client, KubeClientError> {
    let mut config = if cfg.kube_config.is_empty() {
        kube::Config::infer()
            .await
            .map_err(KubeClientError::Infer)?
    } else {
        let kc = Kubeconfig::read_from(&cfg.kube_config).map_err(|source| {
            KubeClientError::Kubeconfig {
                path: cfg.kube_config.clone(),
                source,
            }
        })?;
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|source| KubeClientError::Kubeconfig {
                path: cfg.kube_config.clone(),
                source,
            })?
    };
    if !cfg.master.is_empty() {
        config.cluster_url = cfg
            .master
            .parse()
            .map_err(|_| KubeClientError::BadMaster(cfg.master.clone()))?;
    }
    let limit = ApiRequestLayer::new(TokenBucket::new(cfg.qps, cfg.burst)?, counts);
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(KubeClientError::Client)?
        .with_layer(&limit)
        .build())
}
