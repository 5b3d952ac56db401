//! The shipped Envoy and Istio configuration: Envoy itself validates every
//! bootstrap in `envoy/` and `deploy/`, and the Istio resources agree with
//! each other and with the verifier's gRPC door.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

use crate::harness::{envoy_bin, is_envoy_config, repo};

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn envoy_validates_every_envoy_config_in_the_repo() {
    let envoy = envoy_bin();
    let configs: Vec<PathBuf> = ["envoy", "deploy"]
        .iter()
        .flat_map(|dir| files_under(&repo().join(dir)))
        .filter(|path| is_envoy_config(path))
        .collect();
    assert!(
        configs.contains(&repo().join("envoy/envoy.yaml")),
        "the front proxy config was not found: {configs:?}"
    );
    for config in &configs {
        let output = Command::new(&envoy)
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "-l",
                "error",
                "-c",
            ])
            .arg(config)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("OK"),
            "{} does not validate:\n{stdout}\n{}",
            config.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn istio_sends_the_custom_action_to_the_grpc_door_failing_closed() {
    let policy = yaml("envoy/istio/authorization-policy.yaml");
    assert_eq!(policy["kind"].as_str(), Some("AuthorizationPolicy"));
    assert_eq!(policy["spec"]["action"].as_str(), Some("CUSTOM"));
    let provider_name = policy["spec"]["provider"]["name"].as_str().unwrap();

    let mesh = yaml("envoy/istio/mesh-config.yaml");
    let providers = mesh["meshConfig"]["extensionProviders"]
        .as_sequence()
        .expect("meshConfig.extensionProviders");
    let provider = providers
        .iter()
        .find(|p| p["name"].as_str() == Some(provider_name))
        .unwrap_or_else(|| panic!("no extension provider named {provider_name}"));
    let grpc = &provider["envoyExtAuthzGrpc"];
    assert_eq!(grpc["port"].as_u64(), Some(9191));
    assert_eq!(grpc["failOpen"].as_bool(), Some(false));
    assert_eq!(
        grpc["includeRequestBodyInCheck"]["allowPartialMessage"].as_bool(),
        Some(true),
        "a cut body must reach the verifier marked partial, to be refused"
    );
    let timeout = grpc["timeout"].as_str().expect("an explicit timeout");
    let ms: f64 = match timeout.strip_suffix("ms") {
        Some(ms) => ms.parse().unwrap(),
        None => timeout.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1000.0,
    };
    assert!(
        ms > 750.0,
        "timeout {timeout} is within the verifier's own budgets"
    );
}

/// Every document of a multi-document YAML file.
fn yaml_documents(path: &str) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

#[test]
fn the_kubernetes_sidecar_uses_the_guide_probes_and_documented_variables() {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    // The generated ConfigMaps point at the repository's own, tested files.
    for map in kustomization["configMapGenerator"].as_sequence().unwrap() {
        for file in map["files"].as_sequence().unwrap() {
            let source = file.as_str().unwrap().split_once('=').unwrap().1;
            assert!(
                repo().join("deploy/kubernetes").join(source).exists(),
                "{source} does not exist"
            );
        }
    }
    let docs = yaml_documents("deploy/kubernetes/clinic-tools.yaml");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    let verifier = containers
        .iter()
        .find(|c| c["name"] == "casf-verifier")
        .unwrap();
    assert_eq!(verifier["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(verifier["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(verifier["readinessProbe"]["httpGet"]["port"], 8000);

    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut names: Vec<String> = verifier["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    for literal in kustomization["secretGenerator"][0]["literals"]
        .as_sequence()
        .unwrap()
    {
        names.push(
            literal
                .as_str()
                .unwrap()
                .split_once('=')
                .unwrap()
                .0
                .to_owned(),
        );
    }
    for name in names {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "{name} is not in the README's configuration table"
        );
    }
    // The gRPC door stays on loopback: only Envoy's listener is a Service port.
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 10000);
}
