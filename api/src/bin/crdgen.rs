//! Writes the `WhatsAppSession` CustomResourceDefinition as YAML.
//!
//! `cargo run -p wa-api --bin crdgen > crds/whatsappsession.yaml`; a test in this crate
//! fails when the committed file differs from what this prints.

fn main() {
    print!("{}", wa_api::crd::crd_yaml());
}
