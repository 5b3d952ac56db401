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
    let compose_dir = repo().join("deploy/compose");
    // The mTLS variant names certificate files the operator mounts; Envoy
    // opens them to validate, so test-made ones stand in.
    let pki = crate::pki::TestPki::new();
    pki.issue(
        "envoy",
        "subjectAltName=URI:spiffe://clinic/ns/mesh/sa/envoy\nextendedKeyUsage=clientAuth\n",
        "ca",
    );
    let tls_dir = tempfile::tempdir().unwrap();
    for (mounted, made) in [
        ("envoy.crt", "envoy.pem"),
        ("envoy.key", "envoy.key"),
        ("ca.crt", "ca.pem"),
    ] {
        std::fs::copy(pki.path(made), tls_dir.path().join(mounted)).unwrap();
    }
    let tls_dir_shown = format!("{}/", tls_dir.path().display());
    for config in &configs {
        // A compose variant names paths inside its container: validate it
        // with those mapped back to the files the compose file mounts there.
        let text = std::fs::read_to_string(config).unwrap();
        let text = if config.starts_with(&compose_dir) {
            mounted_from_repo(&text, "envoy")
        } else {
            text
        };
        let text = text.replace(MTLS_DIR, &tls_dir_shown);
        let dir = tempfile::tempdir().unwrap();
        let resolved = dir.path().join("envoy.yaml");
        std::fs::write(&resolved, text).unwrap();
        let output = Command::new(&envoy)
            .current_dir(repo())
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "-l",
                "error",
                "-c",
            ])
            .arg(&resolved)
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

/// Where `envoy/envoy-mtls.yaml` expects its certificate files.
const MTLS_DIR: &str = "/etc/envoy/casf-tls/";

#[test]
fn the_mtls_front_proxy_is_the_front_proxy_with_tls_to_the_verifier() {
    let mut mtls = yaml("envoy/envoy-mtls.yaml");
    let clusters = mtls["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    let verifier = clusters
        .iter_mut()
        .find(|c| c["name"] == "casf_verifier")
        .expect("the casf_verifier cluster");
    let socket = verifier
        .as_mapping_mut()
        .unwrap()
        .remove("transport_socket")
        .expect("a transport socket on the casf_verifier cluster");
    let tls = &socket["typed_config"]["common_tls_context"];
    for file in [
        &tls["tls_certificates"][0]["certificate_chain"]["filename"],
        &tls["tls_certificates"][0]["private_key"]["filename"],
        &tls["validation_context"]["trusted_ca"]["filename"],
    ] {
        assert!(file.as_str().unwrap().starts_with(MTLS_DIR), "{file:?}");
    }
    assert!(
        tls["validation_context"]["match_typed_subject_alt_names"]
            .as_sequence()
            .is_some_and(|s| !s.is_empty()),
        "the verifier's certificate must be matched by name"
    );
    // Otherwise the same file, so a change to one is made to both.
    assert_eq!(
        mtls,
        yaml("envoy/envoy.yaml"),
        "envoy-mtls.yaml drifted from envoy.yaml"
    );
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn istio_sends_the_custom_action_to_the_grpc_door_failing_closed() {
    let policy = yaml_documents("deploy/kubernetes/istio/authorization-policy.yaml")
        .into_iter()
        .find(|d| d["spec"]["action"] == "CUSTOM")
        .expect("a CUSTOM AuthorizationPolicy");
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
    // Readiness gates the whole pod: /healthz would take the tool service's
    // reads out of its Service during a Redis or OPA outage.
    assert_eq!(verifier["readinessProbe"]["httpGet"]["path"], "/health");
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

/// `text` with every container path that the compose service `service`
/// mounts replaced by the repository file mounted there.
fn mounted_from_repo(text: &str, service: &str) -> String {
    let compose = yaml("deploy/compose/docker-compose.yml");
    let mut text = text.to_owned();
    for (host, container) in bind_mounts(&compose["services"][service]) {
        text = text.replace(&container, &host.display().to_string());
    }
    text
}

/// The bind mounts of a compose service: (absolute host path, container path).
fn bind_mounts(service: &Value) -> Vec<(PathBuf, String)> {
    let compose_dir = repo().join("deploy/compose");
    service["volumes"]
        .as_sequence()
        .map(|volumes| volumes.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|volume| {
            let spec = volume.as_str().expect("short volume syntax");
            let mut parts = spec.split(':');
            let (source, target) = (parts.next()?, parts.next()?);
            // Named volumes have no path.
            (source.starts_with('.') || source.starts_with('/'))
                .then(|| (compose_dir.join(source), target.to_owned()))
        })
        .collect()
}

/// What each image of the compose stack can run as a healthcheck. This
/// sandbox cannot pull images, so third-party images are described from
/// their published Dockerfiles; the verifier's own image is built and its
/// HEALTHCHECK run by `scripts/image.sh smoke`.
const HEALTHCHECK_TOOLS: &[(&str, &str)] = &[
    ("docker.io/library/postgres:", "pg_isready"),
    ("docker.io/library/redis:", "redis-cli"),
    // The -debug variants carry busybox; the plain image has only `opa`.
    ("docker.io/openpolicyagent/opa:", "wget"),
    ("docker.io/library/python:", "python3"),
    ("docker.io/envoyproxy/envoy:", "bash"),
    ("docker.io/prom/prometheus:", "wget"),
    ("docker.io/grafana/grafana-oss:", "wget"),
    ("casf-verifier:", "casf-verifier"),
];

#[test]
fn the_compose_stack_is_the_guides_with_healthchecks_that_can_run() {
    let compose = yaml("deploy/compose/docker-compose.yml");
    let services = compose["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    for wanted in [
        "postgres",
        "redis",
        "opa",
        "migrate",
        "verifier",
        "envoy",
        "tools",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(&wanted), "no {wanted} service: {names:?}");
    }
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let image = service["image"].as_str().unwrap();
        for (host, _) in bind_mounts(service) {
            assert!(
                host.exists(),
                "{name} mounts {} which does not exist",
                host.display()
            );
        }
        if name == "migrate" {
            assert_eq!(service["restart"], "no", "migrate is one-shot");
            continue;
        }
        let test: Vec<&str> = service["healthcheck"]["test"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} has no healthcheck"))
            .iter()
            .map(|part| part.as_str().unwrap())
            .collect();
        assert_eq!(test[0], "CMD", "{name}: exec form, no shell assumed");
        let (_, tool) = HEALTHCHECK_TOOLS
            .iter()
            .find(|(prefix, _)| image.starts_with(prefix))
            .unwrap_or_else(|| panic!("{name}: unknown image {image}"));
        assert_eq!(test[1], *tool, "{name}: {image} cannot run {}", test[1]);
        if image.starts_with("docker.io/openpolicyagent/opa:") {
            assert!(
                image.ends_with("-debug"),
                "only OPA's -debug image has wget"
            );
        }
        // Every dependency is awaited healthy (or, for migrate, completed).
        if let Some(deps) = service["depends_on"].as_mapping() {
            for (dep, condition) in deps {
                let wanted = if dep == "migrate" {
                    "service_completed_successfully"
                } else {
                    "service_healthy"
                };
                assert_eq!(condition["condition"], wanted, "{name} → {dep:?}");
            }
        }
    }
    // The guide's port: host 8088 → container 8000. Backends stay unpublished.
    assert_eq!(compose["services"]["verifier"]["ports"][0], "8088:8000");
    for internal in ["postgres", "redis", "opa", "migrate"] {
        assert!(
            compose["services"][internal]["ports"].is_null(),
            "{internal} must not be published"
        );
    }
    // The verifier waits for the schema and for every backend it uses.
    let verifier_deps = compose["services"]["verifier"]["depends_on"]
        .as_mapping()
        .unwrap();
    for dep in ["migrate", "redis", "opa"] {
        assert!(
            verifier_deps.contains_key(dep),
            "verifier does not wait for {dep}"
        );
    }
    // The JWKS Envoy trusts in compose is the one `dev-token` signs with.
    let mounts = bind_mounts(&compose["services"]["envoy"]);
    let jwks = mounts
        .iter()
        .find(|(_, target)| target.ends_with("jwks.json"))
        .expect("the dev JWKS is mounted into envoy");
    assert_eq!(
        std::fs::canonicalize(&jwks.0).unwrap(),
        repo().join("envoy/dev/jwks.json")
    );
}

#[test]
fn every_envoy_front_proxy_sets_the_mode_header_itself() {
    let routes = yaml("envoy/routes.yaml");
    let header = routes["mode"]["header"].as_str().unwrap_or("x-casf-mode");
    for path in [
        "envoy/envoy.yaml",
        "envoy/envoy-mtls.yaml",
        "envoy/envoy-dev.yaml",
        "deploy/compose/envoy.yaml",
        "deploy/kubernetes/files/envoy.yaml",
    ] {
        let config = yaml(path);
        let filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["http_filters"]
            .as_sequence()
            .unwrap();
        let position = |name: &str| filters.iter().position(|f| f["name"] == name);
        let mutation = position("envoy.filters.http.header_mutation")
            .unwrap_or_else(|| panic!("{path}: no header_mutation filter"));
        let ext_authz = position("envoy.filters.http.ext_authz").unwrap();
        assert!(
            mutation < ext_authz,
            "{path}: the mode must be set before the check"
        );
        let set = &filters[mutation]["typed_config"]["mutations"]["request_mutations"][0]["append"];
        assert_eq!(set["header"]["key"], header, "{path}");
        assert_eq!(set["append_action"], "OVERWRITE_IF_EXISTS_OR_ADD", "{path}");
    }
    // The Istio variant does the same in the tool service's sidecar.
    let filter = yaml("deploy/kubernetes/istio/mode-header.yaml");
    let patch = &filter["spec"]["configPatches"][0];
    assert_eq!(patch["patch"]["operation"], "INSERT_BEFORE");
    assert_eq!(
        patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
        "envoy.filters.http.ext_authz"
    );
    let set =
        &patch["patch"]["value"]["typed_config"]["mutations"]["request_mutations"][0]["append"];
    assert_eq!(set["header"]["key"], header);
}

#[test]
fn kustomize_copies_are_the_repositorys_own_files() {
    for (copy, original) in [
        ("deploy/kubernetes/files/envoy.yaml", "envoy/envoy.yaml"),
        ("deploy/kubernetes/files/routes.yaml", "envoy/routes.yaml"),
        ("deploy/kubernetes/files/casf.rego", "policies/casf.rego"),
        (
            "deploy/kubernetes/istio/files/casf.rego",
            "policies/casf.rego",
        ),
    ] {
        let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap();
        assert!(
            read(copy) == read(original),
            "{copy} differs from {original}: cp {original} {copy}"
        );
    }
    // The Istio route map differs in one place: the mesh sets the identity
    // headers from verified claims, so they are trusted there.
    let mut istio = yaml("deploy/kubernetes/istio/files/routes.yaml");
    assert_eq!(istio["identity"]["headers"]["trusted"], true);
    istio["identity"]["headers"]["trusted"] = Value::Bool(false);
    assert_eq!(istio, yaml("envoy/routes.yaml"));
}

#[test]
fn istio_resources_agree_with_the_shipped_deployment_and_service() {
    let dir = "deploy/kubernetes/istio";
    let docs: Vec<Value> = ["verifier.yaml", "clinic-tools.yaml"]
        .iter()
        .flat_map(|f| yaml_documents(&format!("{dir}/{f}")))
        .collect();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    // The provider points at the shipped Service, on its gRPC port.
    let mesh = yaml("envoy/istio/mesh-config.yaml");
    let provider = &mesh["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"];
    let service = find("Service", "casf-verifier");
    assert_eq!(
        provider["service"].as_str().unwrap(),
        format!(
            "casf-verifier.{}.svc.cluster.local",
            service["metadata"]["namespace"].as_str().unwrap()
        )
    );
    assert!(
        service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["port"] == provider["port"]),
        "the Service does not expose the provider's port"
    );
    let verifier = find("Deployment", "casf-verifier");
    assert_eq!(
        verifier["spec"]["template"]["metadata"]["labels"]["app"],
        service["spec"]["selector"]["app"]
    );
    let container = &verifier["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");

    // Every policy, authentication and filter selects the tool service's
    // pods, in their namespace.
    let tools = find("Deployment", "clinic-tools");
    let namespace = &tools["metadata"]["namespace"];
    let labels = &tools["spec"]["template"]["metadata"]["labels"];
    for file in [
        "authorization-policy.yaml",
        "request-authentication.yaml",
        "mode-header.yaml",
    ] {
        for doc in yaml_documents(&format!("{dir}/{file}")) {
            assert_eq!(&doc["metadata"]["namespace"], namespace, "{file}");
            let selector = if doc["kind"] == "EnvoyFilter" {
                &doc["spec"]["workloadSelector"]["labels"]
            } else {
                &doc["spec"]["selector"]["matchLabels"]
            };
            for (key, value) in selector.as_mapping().unwrap() {
                assert_eq!(&labels[key], value, "{file} selects {key:?}={value:?}");
            }
        }
    }
    // The claims the mesh copies into headers are the route map's.
    let routes = yaml(&format!("{dir}/files/routes.yaml"));
    let auth = yaml(&format!("{dir}/request-authentication.yaml"));
    let copied: Vec<(&str, &str)> = auth["spec"]["jwtRules"][0]["outputClaimToHeaders"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (m["claim"].as_str().unwrap(), m["header"].as_str().unwrap()))
        .collect();
    let identity = &routes["identity"];
    for (claim, header) in [
        (&identity["jwt"]["role_claim"], &identity["headers"]["role"]),
        (
            &identity["jwt"]["tenant_claim"],
            &identity["headers"]["tenant_id"],
        ),
    ] {
        assert!(
            copied.contains(&(claim.as_str().unwrap(), header.as_str().unwrap())),
            "{claim:?} is not copied to {header:?}: {copied:?}"
        );
    }
}
