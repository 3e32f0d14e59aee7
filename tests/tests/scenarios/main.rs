//! The end-to-end scenarios: the real `wa-operator`, `wa-gateway` (Kubernetes mode) and
//! `wa-session` pods on the test control plane, driven with real kubectl where a user would
//! use it and through the gateway's REST API where an integrator would.
//!
//! Each scenario starts its own stack (control plane, gateway, operator), so a failure in one
//! never leaves state for another; a stack starts in about a second. Every scenario also
//! watches the session pods and fails if two ever existed at once for one session.
//!
//! Needs the workspace binaries built (`cargo build --bins`) and kubectl on PATH.

mod common;
mod fleet;
mod lifecycle;
mod operator;
mod whatsapp;
