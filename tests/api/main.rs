//! Black-box tests through real sockets: each test starts its own application
//! on port 0 (HTTP and gRPC doors), on embedded backends with its own SQLite
//! audit file, or on the test services (`CASF_TEST_*`, started by
//! `./scripts/test.sh`): PostgreSQL with a database of its own, Redis and the
//! OPA-compatible server.

mod audit;
mod audit_proof;
mod audit_spool;
mod callers;
#[path = "../support/chain_rule.rs"]
mod chain_rule;
mod connections;
mod contract;
mod disconnect;
mod door_tls;
mod ext_authz;
mod helpers;
mod mode_floor;
mod opa_policy;
mod operator;
mod otel;
#[path = "../support/otlp_receiver.rs"]
mod otlp_receiver;
mod pg;
#[path = "../support/pki.rs"]
mod pki;
mod policy_reload;
mod postgres_audit;
mod production;
mod properties_pg;
mod redis_state;
mod replay_reload;
mod secret_hygiene;
mod servers;
mod tls;
mod verify;
