//! Integration tests of the gateway: the real `wa-gateway` binary in local mode with real
//! sandbox session processes, on SQLite and on PostgreSQL (every scenario runs on both);
//! plus in-process tests of the router and the Kubernetes directory.

mod common;

mod compat;
mod errors;
mod faults;
mod inprocess;
mod keys;
mod kube;
mod messages;
mod overload;
mod security;
mod sessions;
mod webhooks;
