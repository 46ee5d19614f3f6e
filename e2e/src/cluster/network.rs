//! The node's pod network, which stays on this machine: a bridge with a private /24
//! whose host side is the node IP, pods without a default route (only the pod subnet
//! and the Service range, through the node), no NAT out of the machine, and a guard in
//! front of forwarding that drops anything from the pod subnet that would leave the
//! bridge, and anything for it that did not come from the bridge.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::json;

/// Name of the bridge.
pub const BRIDGE: &str = "cloudpass0";
/// The pod subnet.
pub const POD_SUBNET: &str = "10.244.77.0/24";
/// The node's address: the host side of the bridge, the pods' gateway to Services. Servers
/// pods must reach (the apiserver, the cloud emulators, CoreDNS) listen here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 77, 1);
/// The Service IP range.
pub const SERVICE_CIDR: &str = "10.96.77.0/24";
/// The `kubernetes` Service's ClusterIP (the first address of the range).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 1);
/// The CNI network's name (also the prefix of libcni's cached results).
pub const CNI_NETWORK: &str = "cloudpass-node";
/// The iptables chain (table `mangle`, hook FORWARD) that keeps pod traffic on the bridge.
/// In `mangle`, it runs before the filter table's FORWARD chain, where kube-proxy puts
/// its own accept rules first.
pub const GUARD_CHAIN: &str = "CLOUDPASS-NODE";

/// Creates the bridge with the node IP and the forwarding guard. Fails when the host
/// already routes the pod subnet or the Service range elsewhere.
pub fn create() -> Result<()> {
    for (what, range) in [("pod subnet", POD_SUBNET), ("Service range", SERVICE_CIDR)] {
        let routes = output(Command::new("ip").args(["-4", "route", "show", "match", range]))?;
        // Only the default route may cover it (and pods have none).
        if let Some(route) = routes.lines().find(|l| !l.starts_with("default")) {
            bail!("this machine already routes the test bed's {what} {range}: {route}");
        }
    }
    let gateway = format!("{NODE_IP}/{}", POD_SUBNET.split_once('/').expect("a CIDR").1);
    run(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
    run(Command::new("ip").args(["addr", "add", &gateway, "dev", BRIDGE]))?;
    run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
    let iptables = |args: &[&str]| run(Command::new("iptables").args(["-w", "-t", "mangle"]).args(args));
    iptables(&["-N", GUARD_CHAIN])?;
    iptables(&["-A", GUARD_CHAIN, "-s", POD_SUBNET, "!", "-o", BRIDGE, "-j", "DROP"])?;
    iptables(&["-A", GUARD_CHAIN, "-d", POD_SUBNET, "!", "-i", BRIDGE, "-j", "DROP"])?;
    iptables(&["-I", "FORWARD", "1", "-j", GUARD_CHAIN])?;
    Ok(())
}

/// The CNI configuration list (`bridge` with `host-local`, and `loopback`): the gateway is
/// the node IP, `ipMasq` is off, and the only route besides the subnet's own is the
/// Service range through the node. `data_dir` holds host-local's address leases.
pub fn cni_config(data_dir: &std::path::Path) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "isDefaultGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP.to_string()}]],
                    "routes": [{"dst": SERVICE_CIDR, "gw": NODE_IP.to_string()}],
                    "dataDir": data_dir,
                },
            },
            {"type": "loopback"},
        ],
    })
}

/// Whether `address` is one tests may send traffic to: loopback, the node IP or a pod.
pub fn is_local_target(address: std::net::IpAddr) -> bool {
    let std::net::IpAddr::V4(v4) = address else { return address.is_loopback() };
    let subnet = u32::from(NODE_IP) & 0xffff_ff00;
    v4.is_loopback() || u32::from(v4) & 0xffff_ff00 == subnet
}

fn run(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_the_node_and_pods_are_local_targets() {
        for ok in ["127.0.0.1", "10.244.77.1", "10.244.77.23", "::1"] {
            assert!(is_local_target(ok.parse().unwrap()), "{ok}");
        }
        for not in ["10.244.78.1", "10.96.77.1", "192.0.2.2", "8.8.8.8", "fd00::2"] {
            assert!(!is_local_target(not.parse().unwrap()), "{not}");
        }
    }

    #[test]
    fn pods_get_no_default_route_and_no_nat() {
        let config = cni_config(std::path::Path::new("/x"));
        let bridge = &config["plugins"][0];
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["isDefaultGateway"], false);
        let routes = bridge["ipam"]["routes"].as_array().unwrap();
        assert!(routes.iter().all(|r| r["dst"] != "0.0.0.0/0"), "{routes:?}");
    }
}
