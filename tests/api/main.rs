//! Black-box tests of the HTTP and gRPC doors on embedded backends: each test starts
//! its own application on port 0 with its own SQLite audit file.

mod audit;
mod ext_authz;
mod helpers;
mod operator;
mod verify;
