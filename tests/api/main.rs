//! Black-box tests of the HTTP door on embedded backends: each test starts
//! its own application on port 0 with its own SQLite audit file.

mod audit;
mod helpers;
mod operator;
mod verify;
