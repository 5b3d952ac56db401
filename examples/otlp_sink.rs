//! An OTLP/gRPC trace receiver for measurements: listens on the address
//! given (default 127.0.0.1:4317), keeps the spans, and prints how many it
//! received every second.

#[path = "../tests/support/otlp_receiver.rs"]
#[allow(dead_code)]
mod otlp_receiver;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_owned());
    let receiver = otlp_receiver::OtlpReceiver::start_on(&addr).await;
    println!("listening on {}", receiver.endpoint());
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        println!("spans {}", receiver.count());
    }
}
