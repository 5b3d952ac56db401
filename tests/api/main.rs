//! Black-box tests of the HTTP door: each test starts its own application on
//! port 0 with its own SQLite audit file, on embedded backends or on the test
//! services (`CASF_TEST_*`, started by `./scripts/test.sh`).

mod audit;
mod contract;
mod helpers;
mod opa_policy;
mod operator;
mod redis_state;
mod servers;
mod verify;
