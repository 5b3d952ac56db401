//! The wire contract as types: what a tool call is and what the verifier says
//! about it. Doors parse into these; the pipeline only ever sees parsed values.

mod request;
mod response;

pub use request::{
    MAX_BODY_BYTES, MAX_REQUEST_ID_CHARS, Mode, RequestError, RequestId, Role, Tool, VerifyRequest,
};
pub use response::{Decision, VerifyResponse, violation};
