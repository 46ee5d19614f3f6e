//! A real one-node Kubernetes cluster on this machine: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, containerd with runc, a kubelet, kube-proxy
//! and CoreDNS, all built or installed by the project's own scripts (`make tools`,
//! `e2e/tools/node-packages.sh`), with the images of `make images` imported.
//!
//! Pods run for real: Deployments make ReplicaSets, the scheduler places their pods, the
//! kubelet starts them through containerd, kube-proxy routes Service addresses and
//! CoreDNS answers `*.svc.cluster.local`. The pod network stays on this machine
//! ([`network`]). The apiserver listens on the node IP, where pods reach it through the
//! `kubernetes` Service.
//!
//! One node at a time per machine: a watchdog (`e2e/node/watchdog.sh`) holds a lock for
//! the node's whole life, cleans up what an earlier (possibly killed) run left before this
//! one starts, and removes everything and restores the kernel settings once the cluster
//! is dropped or the test process exits, however it exits.
//!
//! The settings this machine needs (cgroup v1, no `CAP_SYS_RESOURCE`, a non-loopback node
//! IP) are those of `../shared/reference/real-node.md`, recorded in `docs/testbed.md`.

pub mod network;

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::{
    ControlPlane,
    control_plane::ControlPlaneOptions,
    images::{self, BuiltImage},
    process::{ManagedProcess, free_port},
    repo_root, tools_bin,
};
pub use network::{KUBERNETES_SERVICE_IP, NODE_IP, POD_SUBNET, SERVICE_CIDR};

/// The node's name.
pub const NODE_NAME: &str = "cloudpass-node";
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The kubelet's cgroup root, in every cgroup v1 hierarchy: everything of the pods lives
/// below it, which is how the cleanup finds their processes.
const CGROUP_ROOT: &str = "cloudpass-node";
/// The Go-built binaries a node needs on top of the control plane's.
const NODE_TOOLS: &[&str] = &[
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "coredns",
];

/// Where a node keeps its state: fixed places (overridable for a second machine user),
/// so that a run after a killed one finds and removes what it left.
#[derive(Clone, Debug)]
pub struct NodeDirs {
    /// Persistent state: containerd's root, the kubelet's root, the control plane, logs.
    pub state: PathBuf,
    /// Runtime state: containerd's sockets, shims and network namespaces.
    pub run: PathBuf,
}

impl Default for NodeDirs {
    fn default() -> Self {
        let var = |name: &str, default: &str| std::env::var_os(name).map_or_else(|| default.into(), PathBuf::from);
        Self {
            state: var("CLOUDPASS_NODE_DIR", "/var/lib/cloudpass-node"),
            run: var("CLOUDPASS_NODE_RUN_DIR", "/run/cloudpass-node"),
        }
    }
}

/// Node processes in stop order: the kubelet first (it would restart what the others
/// stop), containerd last among the node parts, then the control plane's own.
struct NodeProcesses {
    kubelet: Mutex<ManagedProcess>,
    kube_proxy: Mutex<ManagedProcess>,
    coredns: Mutex<ManagedProcess>,
    scheduler: Mutex<ManagedProcess>,
    controller_manager: Mutex<ManagedProcess>,
    containerd: Mutex<ManagedProcess>,
}

impl NodeProcesses {
    fn all(&self) -> [&Mutex<ManagedProcess>; 6] {
        [&self.kubelet, &self.kube_proxy, &self.coredns, &self.scheduler, &self.controller_manager, &self.containerd]
    }
}

/// A running one-node cluster.
pub struct Cluster {
    // Field order is drop order: the node's processes, the control plane, and last the
    // watchdog, whose cleanup removes what the processes left (pods, mounts, network).
    processes: NodeProcesses,
    /// The control plane, on the node IP; every helper of [`ControlPlane`] works on it.
    pub cp: ControlPlane,
    /// The images imported into containerd (the cloudpass images, the pause image, the
    /// test apps).
    pub images: Vec<BuiltImage>,
    /// Where the node keeps its state.
    pub dirs: NodeDirs,
    containerd_socket: PathBuf,
    _watchdog: Watchdog,
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

impl Cluster {
    /// The cluster shared by every test of this test binary, started on first use. It
    /// lives until the test process exits; the watchdog then removes it. Panics with the
    /// reason if it cannot start (not root, no cgroups, tools missing).
    pub fn shared() -> &'static Cluster {
        crate::start_once(&SHARED, "the local cluster", Self::start)
    }

    /// Why this machine cannot run a node, if it cannot: not root, no cgroup v1
    /// hierarchies, missing tools or packages; each with what to do.
    pub fn unsupported_reason() -> Option<String> {
        let uid = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Uid:").map(|u| u.split_whitespace().next().map(str::to_owned)))
            })
            .flatten();
        if uid.as_deref() != Some("0") {
            return Some(
                "a real node needs root (it creates a bridge, cgroups, mounts and iptables rules); run as root, \
                 e.g. in a disposable VM"
                    .into(),
            );
        }
        for controller in ["cpu", "memory", "pids", "cpuset", "devices", "freezer"] {
            if !Path::new("/sys/fs/cgroup").join(controller).join("cgroup.procs").exists() {
                return Some(format!(
                    "the cgroup v1 hierarchy /sys/fs/cgroup/{controller} is not mounted; this test bed runs the kubelet \
                     on cgroup v1 (see docs/testbed.md)"
                ));
            }
        }
        let bin = match tools_bin() {
            Ok(bin) => bin,
            Err(e) => return Some(format!("{e:#}")),
        };
        if let Some(missing) = NODE_TOOLS.iter().find(|t| !bin.join(t).is_file()) {
            return Some(format!("{} is missing: run `make tools`", bin.join(missing).display()));
        }
        let packages = repo_root().join("e2e/tools/node-packages.sh");
        match Command::new(&packages).arg("--check").output() {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(e) => Some(format!("running {}: {e}", packages.display())),
        }
    }

    /// Starts a cluster with every image (prefer [`Cluster::shared`]: one per test
    /// binary), waiting until the node is Ready and cluster DNS answers. Builds the
    /// images first if they are out of date (a no-op after `make images`).
    pub async fn start() -> Result<Self> {
        Self::start_with_images(Vec::new()).await
    }

    /// Starts a cluster with only the images named (short names as
    /// [`images::BuildOptions::only`]; the pause image always), or all when empty.
    pub async fn start_with_images(only: Vec<String>) -> Result<Self> {
        if let Some(reason) = Self::unsupported_reason() {
            bail!("this machine cannot run a test-bed node: {reason}");
        }
        let bin = tools_bin()?;
        let mut only = only;
        if !only.is_empty() && !only.iter().any(|i| i == "pause") {
            only.push("pause".into());
        }
        let options = images::BuildOptions { only, ..Default::default() };
        let built = tokio::task::spawn_blocking(move || images::build_all(&options))
            .await
            .context("image build panicked")??;
        // The node's own start, without the image build (a no-op after `make images`).
        let started = Instant::now();
        let dirs = NodeDirs::default();
        let cleaning = Instant::now();
        let watchdog = Watchdog::start(&dirs, &bin)?;
        eprintln!("cluster: clean slate in {:.1}s", cleaning.elapsed().as_secs_f64());
        let state = &dirs.state;
        fs::create_dir_all(state.join("logs"))?;
        fs::create_dir_all(&dirs.run)?;
        create_cgroup_root()?;
        network::create()?;

        let cp = ControlPlane::start_with(ControlPlaneOptions {
            address: NODE_IP.into(),
            dir: Some(state.join("control-plane")),
            service_cidr: SERVICE_CIDR.into(),
            extra_sans: [
                KUBERNETES_SERVICE_IP.to_string(),
                "kubernetes".into(),
                "kubernetes.default".into(),
                "kubernetes.default.svc".into(),
                format!("kubernetes.default.svc.{CLUSTER_DOMAIN}"),
            ]
            .into(),
            extra_args: vec![
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ServiceAccount"
                    .into(),
                // The `kubernetes` Service's endpoint is the advertised node IP.
                "--endpoint-reconciler-type=lease".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ],
            kubelet_client: true,
        })
        .await?;
        let logs = state.join("logs");
        let path_env = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let spawn = |name: &str, program: &str, args: Vec<String>| {
            ManagedProcess::spawn(
                name,
                &bin.join(program),
                &args,
                &logs.join(format!("{name}.log")),
                &[("PATH", path_env.as_str())],
            )
        };
        let ca_file = cp.dir().join("ca.crt");

        // containerd, with the images.
        let containerd_socket = dirs.run.join("containerd/containerd.sock");
        let containerd_config = state.join("containerd.toml");
        let pause = built.iter().find(|i| i.name == images::PAUSE_IMAGE).context("no pause image was built")?;
        fs::create_dir_all(state.join("cni/net.d"))?;
        fs::write(
            state.join("cni/net.d/10-cloudpass-node.conflist"),
            serde_json::to_string_pretty(&network::cni_config(&state.join("cni/networks")))?,
        )?;
        fs::write(&containerd_config, containerd_toml(&dirs, &containerd_socket, &pause.name))?;
        let mut containerd =
            spawn("containerd", "containerd", vec![format!("--config={}", containerd_config.display())])?;
        containerd
            .wait_until("containerd's socket", Duration::from_secs(30), || async { containerd_socket.exists() })
            .await?;
        let import_started = Instant::now();
        images::import(&bin.join("ctr"), &containerd_socket, &built)?;
        eprintln!("cluster: {} images imported in {:.1}s", built.len(), import_started.elapsed().as_secs_f64());

        // The control plane's controllers.
        let kcm_kubeconfig = cp.kubeconfig_for_user("controller-manager", "system:kube-controller-manager", &[])?;
        let controller_manager = spawn(
            "kube-controller-manager",
            "kube-controller-manager",
            vec![
                format!("--kubeconfig={}", kcm_kubeconfig.display()),
                format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
                format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                // kube-root-ca.crt in every namespace, for the pods' projected token volumes.
                format!("--root-ca-file={}", ca_file.display()),
                format!("--service-account-private-key-file={}", cp.sa_key_file.display()),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--cluster-cidr={POD_SUBNET}"),
                "--allocate-node-cidrs=false".into(),
                "--v=1".into(),
            ],
        )?;
        let scheduler_kubeconfig = cp.kubeconfig_for_user("scheduler", "system:kube-scheduler", &[])?;
        let scheduler = spawn(
            "kube-scheduler",
            "kube-scheduler",
            vec![
                format!("--kubeconfig={}", scheduler_kubeconfig.display()),
                format!("--authentication-kubeconfig={}", scheduler_kubeconfig.display()),
                format!("--authorization-kubeconfig={}", scheduler_kubeconfig.display()),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
                "--leader-elect=false".into(),
                "--v=1".into(),
            ],
        )?;

        // The kubelet.
        let kubelet_dir = state.join("kubelet");
        fs::create_dir_all(&kubelet_dir)?;
        let serving = cp.ca.issue_server(&[&NODE_IP.to_string(), NODE_NAME])?;
        fs::write(kubelet_dir.join("kubelet.crt"), &serving.cert_pem)?;
        fs::write(kubelet_dir.join("kubelet.key"), &serving.key_pem)?;
        let kubelet_kubeconfig =
            cp.kubeconfig_for_user("kubelet", &format!("system:node:{NODE_NAME}"), &["system:nodes"])?;
        let kubelet_config = kubelet_dir.join("config.json");
        let kubelet_port = free_port()?;
        let kubelet_healthz = free_port()?;
        fs::write(
            &kubelet_config,
            serde_json::to_string_pretty(&kubelet_configuration(
                &kubelet_dir,
                &ca_file,
                &containerd_socket,
                &state.join("pod-logs"),
                kubelet_port,
                kubelet_healthz,
            ))?,
        )?;
        let mut kubelet = spawn(
            "kubelet",
            "kubelet",
            vec![
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", kubelet_kubeconfig.display()),
                format!("--root-dir={}", kubelet_dir.display()),
                format!("--cert-dir={}", kubelet_dir.join("pki").display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                "--v=1".into(),
            ],
        )?;

        // kube-proxy: Service addresses, for pods and for this host.
        let proxy_kubeconfig = cp.kubeconfig_for_user("kube-proxy", "system:kube-proxy", &[])?;
        let proxy_config = state.join("kube-proxy.json");
        let proxy_healthz = free_port()?;
        fs::write(
            &proxy_config,
            serde_json::to_string_pretty(&kube_proxy_configuration(&proxy_kubeconfig, proxy_healthz)?)?,
        )?;
        let kube_proxy =
            spawn("kube-proxy", "kube-proxy", vec![format!("--config={}", proxy_config.display()), "--v=1".into()])?;

        // CoreDNS: *.svc.cluster.local on the node IP, nothing else (no upstream).
        cp.apply_yaml(None, COREDNS_RBAC)?;
        let dns_kubeconfig = cp.kubeconfig_for_user("coredns", "system:coredns", &[])?;
        let dns_ready = free_port()?;
        let corefile = state.join("Corefile");
        fs::write(&corefile, corefile_text(&dns_kubeconfig, dns_ready))?;
        let mut coredns = spawn("coredns", "coredns", vec![format!("-conf={}", corefile.display())])?;

        kubelet
            .wait_until("the node to be Ready", Duration::from_secs(90), || async { node_ready(&cp).unwrap_or(false) })
            .await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        coredns
            .wait_until("CoreDNS /ready", Duration::from_secs(60), || {
                let request = http.get(format!("http://127.0.0.1:{dns_ready}/ready"));
                async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
            })
            .await?;

        let cluster = Self {
            processes: NodeProcesses {
                kubelet: Mutex::new(kubelet),
                kube_proxy: Mutex::new(kube_proxy),
                coredns: Mutex::new(coredns),
                scheduler: Mutex::new(scheduler),
                controller_manager: Mutex::new(controller_manager),
                containerd: Mutex::new(containerd),
            },
            cp,
            images: built,
            dirs,
            containerd_socket,
            _watchdog: watchdog,
        };
        eprintln!(
            "cluster: node {NODE_NAME} Ready at {} in {:.1}s (state: {})",
            cluster.cp.server,
            started.elapsed().as_secs_f64(),
            cluster.dirs.state.display()
        );
        Ok(cluster)
    }

    /// The image of this name that was imported (e.g. [`images::PAUSE_IMAGE`]).
    pub fn image(&self, name_prefix: &str) -> Result<&BuiltImage> {
        self.images.iter().find(|i| i.name.starts_with(name_prefix)).ok_or_else(|| anyhow!("no image {name_prefix}*"))
    }

    /// containerd's socket (for `ctr`).
    pub fn containerd_socket(&self) -> &Path {
        &self.containerd_socket
    }

    /// The tails of every node process's log, then the control plane's.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for process in self.processes.all() {
            if let Ok(p) = process.lock() {
                out.push_str(&format!("---- {} ({}) ----\n{}\n", p.name(), p.log_path().display(), p.log_tail(4000)));
            }
        }
        out + &self.cp.log_tails()
    }
}

/// Holds the node lock and cleans up (see `e2e/node/watchdog.sh`); dropping it closes the
/// pipe, and the drop waits for the cleanup to finish.
struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    fn start(dirs: &NodeDirs, bin: &Path) -> Result<Self> {
        let script = repo_root().join("e2e/node/watchdog.sh");
        let mut child = Command::new(&script)
            .env("CLOUDPASS_NODE_DIR", &dirs.state)
            .env("CLOUDPASS_NODE_RUN_DIR", &dirs.run)
            .env("CLOUDPASS_TOOLS_BIN", bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("{} did not get ready (said {line:?})", script.display());
        }
        Ok(Self { child, stdin })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Creates the kubelet's cgroup root in every hierarchy; a new cpuset cgroup needs its
/// CPUs and memory nodes before anything can join it.
fn create_cgroup_root() -> Result<()> {
    for entry in fs::read_dir("/sys/fs/cgroup")? {
        let hierarchy = entry?.path();
        if !hierarchy.join("cgroup.procs").exists() {
            continue;
        }
        let root = hierarchy.join(CGROUP_ROOT);
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if root.join(file).exists() {
                fs::write(root.join(file), fs::read_to_string(hierarchy.join(file))?.trim())?;
            }
        }
    }
    Ok(())
}

fn node_ready(cp: &ControlPlane) -> Result<bool> {
    let node: Value = serde_json::from_str(&cp.kubectl_ok(&["get", "node", NODE_NAME, "-o", "json"])?)?;
    Ok(node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// containerd's configuration: everything under the node's directories (network
/// namespaces included), CNI from Debian's plugins, the locally built pause image, and
/// the settings this machine needs (no negative OOM scores without CAP_SYS_RESOURCE).
fn containerd_toml(dirs: &NodeDirs, socket: &Path, pause_image: &str) -> String {
    let state = dirs.state.display();
    let run = dirs.run.display();
    format!(
        r#"version = 3
root = "{state}/containerd"
state = "{run}/containerd"
temp = "{state}/containerd-tmp"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{run}/containerd/containerd.sock.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{state}/containerd-opt"

# NRI would open a socket outside the node's directories; nothing here uses it.
[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause_image}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{state}/cni/net.d"
    max_conf_num = 1
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
"#,
        socket = socket.display(),
    )
}

/// The kubelet's configuration (KubeletConfiguration v1beta1).
fn kubelet_configuration(
    dir: &Path,
    ca_file: &Path,
    containerd_socket: &Path,
    pod_logs: &Path,
    port: u16,
    healthz_port: u16,
) -> Value {
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // This machine: cgroup v1, no systemd, no CAP_SYS_RESOURCE.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{CGROUP_ROOT}"),
        "oomScoreAdj": 0,
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{}", containerd_socket.display()),
        "address": NODE_IP.to_string(),
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": dir.join("kubelet.crt"),
        "tlsPrivateKeyFile": dir.join("kubelet.key"),
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": ca_file},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [NODE_IP.to_string()],
        // No search domains or resolvers of this machine in pods.
        "resolvConf": "",
        "podLogsDir": pod_logs,
        "staticPodPath": "",
        "shutdownGracePeriod": "0s",
        // The images were imported, not pulled: nothing could pull them back.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        // Volumes of updated ConfigMaps and Secrets (the broker CA) reach pods quickly.
        "syncFrequency": "10s",
        "serializeImagePulls": false,
        "maxPods": 60,
    })
}

/// kube-proxy's configuration (KubeProxyConfiguration v1alpha1): iptables mode, node
/// ports only on the node IP, and the kernel's conntrack settings left alone.
fn kube_proxy_configuration(kubeconfig: &Path, healthz_port: u16) -> Result<Value> {
    Ok(json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": kubeconfig},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_SUBNET,
        "healthzBindAddress": format!("127.0.0.1:{healthz_port}"),
        "metricsBindAddress": format!("127.0.0.1:{}", free_port()?),
        "nodePortAddresses": [format!("{NODE_IP}/32")],
        "oomScoreAdj": 0,
        "iptables": {"localhostNodePorts": false, "masqueradeAll": false},
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }))
}

/// CoreDNS's Corefile: the cluster domain from the API, on the node IP only, no
/// forwarding (pods resolve nothing outside the cluster), readiness on loopback.
fn corefile_text(kubeconfig: &Path, ready_port: u16) -> String {
    format!(
        r#".:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"#,
        kubeconfig = kubeconfig.display()
    )
}

/// What CoreDNS reads (as kubeadm grants it).
const COREDNS_RBAC: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
"#;
