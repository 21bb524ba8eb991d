//! gRPC bindings generated from `proto/` at build time.
//!
//! - [`cri::v1`]: the Kubernetes Container Runtime Interface v1 (`cri/v1/api.proto`, taken
//!   unchanged from Kubernetes' `cri-api` as packaged in the `k8s-cri` crate 0.11, Apache-2.0).
//!   Only the client is generated; edged is a CRI client of containerd.
//! - [`grpc::health::v1`]: the gRPC health checking protocol, which Kubernetes gRPC probes call.
#![forbid(unsafe_code)]

pub mod cri {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("runtime.v1");
    }
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("grpc.health.v1");
        }
    }
}
