//! gRPC clients over unix sockets (containerd's CRI socket, DMI mappers' sockets): tonic needs an
//! `http://` URI, which the connector ignores and dials the socket instead.

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// A channel to the gRPC server on `socket`. `timeout` bounds each call when set.
pub async fn channel(
    socket: &Path,
    timeout: Option<Duration>,
) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_owned();
    let mut endpoint = Endpoint::from_static("http://unix.socket");
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}
