//! The gateway of wa-operator: the public REST API in front of the session pods.
//!
//! Code map:
//! - [`http`]: the endpoint table (router + OpenAPI), handlers, extractors, compat routes.
//! - [`send`], [`outbox`]: record-then-forward sends, and the outbox that finishes them.
//! - [`directory`]: where sessions live — [`directory::local`] supervises processes,
//!   [`directory::kube`] follows `WhatsAppSession` objects, Pods and Secrets.
//! - [`store`]: SQLite / PostgreSQL through sqlx (keys, messages, events, webhooks).
//! - [`auth`]: API keys (hash only, constant-time), scopes.
//! - [`delivery`]: signed webhook deliveries with retries and a dead-letter state.
//! - [`metrics`]: `/metrics`, and the background collector of the pods' metrics.
//! - [`openapi`], [`model`]: the OpenAPI document and the public wire types.
//! - [`server`], [`config`]: start-up and the command line.

pub mod auth;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod error;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod outbox;
pub mod pod_client;
pub mod send;
pub mod server;
pub mod state;
pub mod store;
pub mod util;
pub mod web;

#[cfg(test)]
mod parsers_proptest;

pub use http::app;
pub use state::{AppState, Gateway, Settings};
