//! Helper for the test that no etcd or kube-apiserver outlives its test process.
//! Starts a control plane, prints its process IDs on one line, then either panics
//! (`panic`) or hangs until killed (`hang`).
use std::io::Write;

use cloudpass_e2e::ControlPlane;

#[tokio::main]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let plane = ControlPlane::start().await.expect("control plane starts");
    let pids: Vec<String> = plane.pids().iter().map(u32::to_string).collect();
    println!("pids {}", pids.join(" "));
    std::io::stdout().flush().expect("stdout");
    let _logs = plane.logs_on_panic();
    match mode.as_str() {
        "hang" => loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        },
        _ => panic!("orphan probe panics on purpose"),
    }
}
