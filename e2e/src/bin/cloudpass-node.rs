//! Starts the test bed's one-node cluster (see `cloudpass_e2e::cluster`) and keeps it
//! running until Ctrl-C, printing how to reach it: for looking around by hand.
#![forbid(unsafe_code)]

use cloudpass_e2e::cluster::Cluster;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let cluster = Cluster::start_with_images(only).await?;
    println!("kubeconfig: {}", cluster.cp.kubeconfig.display());
    println!("state: {}", cluster.dirs.state.display());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
