//! casf-verifier: a policy enforcement point for AI agents' tool calls.
//!
//! One [`pipeline`] decides; thin doors ([`http`], [`ext_authz`]) translate to and from it;
//! each backend ([`policy`], [`state`], [`audit`]) sits behind a small trait
//! with an embedded default and a production implementation.

pub mod audit;
pub mod callers;
pub mod canonical;
pub mod cli;
pub mod config;
pub mod connections;
pub mod dev_token;
pub mod domain;
pub mod door_tls;
pub mod ext_authz;
pub mod grpc;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod labels;
pub mod log_limit;
pub mod metrics;
pub mod mode_floor;
pub mod peer;
pub mod pipeline;
pub mod policy;
pub mod secret;
pub mod startup;
pub mod state;
pub mod strict_json;
pub mod telemetry;
pub mod tls;
