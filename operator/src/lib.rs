//! wa-operator: reconciles each `WhatsAppSession` into one session pod (`wa-<name>`), its
//! auth volume (`wa-<name>-auth`) and its token Secret (`wa-<name>-token`), and brings the
//! pod's phase back to the object's status.
//!
//! - [`desired`]: pure builders, spec → Secret, PVC, Pod (and spec validation).
//! - [`status`]: pure, observed pod + pod report → `status` (phase, conditions).
//! - [`reconcile`]: the reconciler and its error policy; the only module that writes.
//! - [`status_watch`] and [`pod_api`]: the long poll that brings pod phases to the object.
//! - [`leader`]: leader election on a Lease.
//! - [`controller`]: the kube-rs `Controller`, the HTTP port, shutdown.
//! - [`metrics`], [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`rbac`]: every API verb the operator uses.
//! - [`cli`]: the flags and their validation.

pub mod cli;
pub mod controller;
pub mod desired;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pod_api;
pub mod rbac;
pub mod reconcile;
pub mod status;
pub mod status_watch;

#[cfg(test)]
pub(crate) mod testing;
