//! Every manifest in examples/ is accepted by kubectl and the CRD's schema, as a user would
//! apply it.

use crate::{api_only, repo_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_applies_with_kubectl() {
    let cluster = api_only().await;
    let kubectl = cluster.kubectl().unwrap();
    let dir = repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        ["session-pair-code.yaml", "session-qr.yaml", "session-sandbox.yaml", "session-webhooks.yaml"],
        "the examples the README points to"
    );
    for file in &files {
        let out = kubectl.run(&["apply", "-f", file.to_str().unwrap()]).await.unwrap();
        assert!(out.success, "{}: {}", file.display(), out.stderr);
        assert!(!out.stderr.contains("Warning"), "{} has fields the schema does not know: {}", file.display(), out.stderr);
    }
    let table = kubectl.ok(&["get", "wa", "-o", "custom-columns=NAME:.metadata.name,ENGINE:.spec.engine,PHONE:.spec.phoneNumber"]).await.unwrap();
    let rows: Vec<Vec<&str>> = table.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            vec!["crm", "sandbox", "<none>"],
            vec!["sales", "whatsapp", "+15551234567"],
            vec!["sandbox", "sandbox", "<none>"],
            vec!["support", "whatsapp", "<none>"],
        ]
    );
    let crm = kubectl.get_json(&["wa", "crm"]).await.unwrap();
    assert_eq!(crm["spec"]["webhooks"][0]["secretRef"]["name"], "crm-webhook");
    let secret = kubectl.get_json(&["secret", "crm-webhook"]).await.unwrap();
    assert!(secret["data"]["signing-key"].is_string(), "the signing key Secret is stored");
    // Applying again changes nothing. (kubectl says "configured" for a Secret written with
    // stringData, as against any cluster: its patch re-sends stringData; the object stays.)
    let versions = || async {
        let list = kubectl.get_json(&["wa,secrets"]).await.unwrap();
        list["items"].as_array().unwrap().iter().map(|o| o["metadata"]["resourceVersion"].clone()).collect::<Vec<_>>()
    };
    let before = versions().await;
    for file in &files {
        kubectl.ok(&["apply", "-f", file.to_str().unwrap()]).await.unwrap();
    }
    assert_eq!(versions().await, before);
}
