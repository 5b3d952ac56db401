//! End-to-end through a real Envoy (`CASF_TEST_ENVOY`, installed by
//! `./scripts/test.sh`): Envoy's ext_authz filter asks the verifier binary
//! over gRPC, and a recording upstream shows what got through. Every test
//! runs its own verifier, Envoy and upstream on loopback ports.

mod configs;
mod e2e;
mod harness;
mod mtls;
#[path = "../support/pki.rs"]
mod pki;
mod quickstart;
#[path = "../support/upstream.rs"]
mod upstream;
