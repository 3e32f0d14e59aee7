//! The committed CRD must be exactly what the Rust types generate, so the cluster, the chart
//! and the code never disagree. Regenerate with:
//! `cargo run -p wa-api --bin crdgen > crds/whatsappsession.yaml`

#[test]
fn committed_crd_matches_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/whatsappsession.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = wa_api::crd::crd_yaml();
    assert!(
        committed == generated,
        "crds/whatsappsession.yaml is out of date; run `cargo run -p wa-api --bin crdgen > crds/whatsappsession.yaml`"
    );
}
