//! Types shared by every wa-operator binary.
//!
//! - [`crd`]: the `WhatsAppSession` custom resource (`wa-operator.dev/v1alpha1`).
//! - [`pod`]: the session pod's internal HTTP API and the events it delivers to the gateway.
//! - [`ids`]: identifiers parsed once at the edge (`SessionName`, `PhoneNumber`, `Jid`, `Recipient`).
//! - [`names`]: deterministic object names, labels, annotations and ports.
//! - [`error`]: the one JSON error shape and its stable codes.

pub mod crd;
pub mod error;
pub mod ids;
pub mod names;
pub mod pod;

pub use crd::{Engine, Phase, WhatsAppSession, WhatsAppSessionSpec, WhatsAppSessionStatus};
pub use error::{ErrorBody, ErrorCode};
pub use ids::{Jid, PhoneNumber, Recipient, SessionName};
