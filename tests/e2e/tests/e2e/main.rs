//! The end-to-end suite, one test binary: each module was its own binary, and twenty binaries
//! of ~65 MB each (line tables, statically linked) cost CI a gigabyte of disk and a minute of
//! linking. Run one area with a filter, e.g. `cargo nextest run -p kedge-e2e -E 'test(/^chaos::/)'`.

mod apiserver;
mod autonomy;
mod chaos;
mod cloud_controllers;
mod cloud_outage;
mod cri;
mod daemons;
mod devices;
mod edged;
mod helm_chart;
mod kubectl;
mod kubeedge_interop;
mod lifecycle;
mod link;
mod metamanager;
mod node_identity;
mod packaging;
mod partition;
mod replicas;
mod stream_link;
mod streams;
