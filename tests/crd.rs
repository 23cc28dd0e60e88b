//! The committed CRD is exactly what the Rust types generate, and the apiserver accepts it.

#[test]
fn committed_crd_matches_the_types() {
    let generated = rekey::crd_yaml().expect("render CRD");
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/iamkeyrotation.yaml"))
        .expect("read crds/iamkeyrotation.yaml");
    assert!(
        generated == committed,
        "crds/iamkeyrotation.yaml is stale: run `cargo run -- crd > crds/iamkeyrotation.yaml`, copy it to deploy/chart/rekey/crds/, and commit both"
    );
}
