//! The committed CRD YAML must be exactly what the Rust types generate.

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (relative, generated) in rolemesh_crds::generated_files().expect("render CRDs") {
        let committed = std::fs::read_to_string(root.join(relative))
            .unwrap_or_else(|e| panic!("{relative} is missing ({e}); run `make crds`"));
        assert!(
            committed == generated,
            "{relative} differs from what crds/src/lib.rs generates; run `make crds` and commit"
        );
    }
}

#[test]
fn policy_crd_carries_cross_field_rules_and_columns() {
    let yaml = rolemesh_crds::crds_yaml().expect("render CRDs");
    assert!(yaml.contains("x-kubernetes-validations"));
    assert!(yaml.contains("certificate.renewBefore must be shorter than certificate.duration"));
    for column in ["Ready", "Workloads", "Soonest Expiry", "Age"] {
        assert!(
            yaml.contains(&format!("name: {column}")),
            "printer column {column} missing"
        );
    }
}
