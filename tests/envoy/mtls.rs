//! A real Envoy talking to the gRPC door over mTLS (`CASF_TLS_CERT`,
//! `CASF_TLS_KEY`, `CASF_TLS_CLIENT_CA`), the door bound off loopback: with
//! its client certificate Envoy gets decisions and the JWT claims it
//! forwards are honoured; without one it gets no decision and answers 503
//! (`failure_mode_allow: false`); with a certificate that names no peer
//! (no URI or DNS SAN), claims from off loopback are not honoured.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ENVOY_TEMPLATE, Envoy, Idp, Upstream, Verifier, read, routes_yaml};
use crate::pki::{SERVER_EXT, TestPki};

/// A non-loopback address of this host, if it has one: the door's peer is
/// then not on loopback, so only its certificate can make it trusted.
fn host_address() -> Option<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .map(str::to_owned)
}

/// The test template with the ext_authz cluster on TLS to `address`,
/// presenting `client` (a certificate in `pki`) if given.
fn mtls_template(pki: &TestPki, address: &str, client: Option<&str>) -> String {
    let certificate = match client {
        Some(name) => format!(
            "\n            tls_certificates:\n              - certificate_chain: {{ filename: \"{}\" }}\n                private_key: {{ filename: \"{}\" }}",
            pki.shown(&format!("{name}.pem")),
            pki.shown(&format!("{name}.key"))
        ),
        None => String::new(),
    };
    let transport = format!(
        r#"    - name: casf_verifier
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:{certificate}
            validation_context:
              trusted_ca: {{ filename: "{ca}" }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: localhost }}
"#,
        ca = pki.shown("ca.pem")
    );
    let template = ENVOY_TEMPLATE.replacen("    - name: casf_verifier\n", &transport, 1);
    let upstream_of_grpc = "- endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: @GRPC_PORT@ } } }";
    assert!(template.contains(upstream_of_grpc));
    template.replacen(
        upstream_of_grpc,
        &upstream_of_grpc.replace("127.0.0.1", address),
        1,
    )
}

#[tokio::test]
async fn envoy_gets_decisions_over_mtls_and_a_503_without_its_certificate() {
    let pki = TestPki::new();
    pki.issue(
        "envoy",
        "subjectAltName=URI:spiffe://clinic/ns/mesh/sa/envoy\nextendedKeyUsage=clientAuth\n",
        "ca",
    );
    pki.issue("door", SERVER_EXT, "ca");
    let address = host_address();
    let verifier = Verifier::start_with(
        &routes_yaml(false),
        &[
            ("CASF_GRPC_ADDR", "0.0.0.0:0".to_owned()),
            ("CASF_TLS_CERT", pki.shown("door.pem")),
            ("CASF_TLS_KEY", pki.shown("door.key")),
            ("CASF_TLS_CLIENT_CA", pki.shown("ca.pem")),
        ],
    );
    let upstream = Upstream::start().await;
    let idp = Idp::new();
    let target = address.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
    let envoy = |client: Option<&'static str>| {
        let template = mtls_template(&pki, &target, client);
        let (grpc, up, idp) = (verifier.grpc_port, upstream.port, &idp);
        async move { Envoy::start_from(&template, grpc, up, idp).await }
    };
    let client = casf_verifier::tls::http_client_builder().build().unwrap();
    let token = idp.token(json!({
        "sub": "agent-7", "casf_role": "receptionist", "casf_tenant_id": "clinic-a"
    }));
    let call = |envoy: &Envoy| {
        client
            .request(
                Method::GET,
                format!(
                    "{}/cliniccloud/patients/p-1/appointments?day=2026-12-01",
                    envoy.url
                ),
            )
            .bearer_auth(&token)
    };

    let certified = envoy(Some("envoy")).await;
    let (status, body, _) = read(call(&certified)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"upstream": "ok"}"#));
    let rows = verifier.audit_rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "role:receptionist", "the JWT claim was honoured");

    let anonymous = envoy(None).await;
    for _ in 0..3 {
        let (status, _, _) = read(call(&anonymous)).await;
        assert_eq!(
            status, 503,
            "no client certificate: no decision, never the upstream"
        );
    }
    assert_eq!(upstream.requests().len(), 1);
    assert_eq!(verifier.audit_rows().await.len(), 1);

    // A certificate the CA signed, naming no peer: from off loopback its
    // claims are not an identity.
    if address.is_some() {
        let nameless = envoy(Some("client")).await;
        let (status, body, _) = read(call(&nameless)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["field"],
            "role"
        );
        assert_eq!(upstream.requests().len(), 1);
    } else {
        eprintln!("no non-loopback address: the nameless-certificate case was not run");
    }
    drop(certified);
}
