//! Black-box tests through real HTTP: each test starts its own application on
//! port 0, on embedded backends with its own SQLite audit file, or on real
//! PostgreSQL with a database of its own (`pg`, `postgres_audit`).

mod audit;
mod helpers;
mod operator;
mod pg;
mod postgres_audit;
mod verify;
