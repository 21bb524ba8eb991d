//! gRPC bindings generated from `proto/` at build time.
//!
//! - [`cri::v1`]: the Kubernetes Container Runtime Interface v1 (`cri/v1/api.proto`, taken
//!   unchanged from Kubernetes' `cri-api` as packaged in the `k8s-cri` crate 0.11, Apache-2.0).
//!   Only the client is generated; edged is a CRI client of containerd.
//! - [`grpc::health::v1`]: the gRPC health checking protocol, which Kubernetes gRPC probes call.
//! - [`dmi::v1beta1`]: KubeEdge's device management interface between edgecore and mappers
//!   (written from KubeEdge's field list; same package, names and field numbers on the wire).
#![forbid(unsafe_code)]

pub mod cri {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("runtime.v1");
    }
}

/// KubeEdge's device management interface (`dmi/v1beta1/api.proto`, package `v1beta1`).
pub mod dmi {
    pub mod v1beta1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("v1beta1");
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
