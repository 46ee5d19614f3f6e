//! Server processes (etcd, kube-apiserver, later the cloudpass binaries) that cannot
//! outlive the test process that started them.
//!
//! Each server runs under a small `sh` wrapper whose standard input is a pipe from the
//! test process. The wrapper stops the server (TERM, then KILL after 5 s) as soon as that
//! pipe closes: when the [`ManagedProcess`] is dropped, including while a test panics,
//! and when the test process exits or is killed, because the kernel closes the pipe then.
//! No `unsafe` (no `prctl`), no orphaned etcd.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

// $1: pid file; the rest: the server command. fd 3 keeps the pipe for the watchdog,
// because a background job's stdin is /dev/null in a non-interactive shell.
const WRAPPER: &str = r#"
pid_file=$1; shift
exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
echo "$pid" > "$pid_file"
{ cat <&3 >/dev/null; kill -TERM "$pid" 2>/dev/null; sleep 5; kill -KILL "$pid" 2>/dev/null; } &
wait "$pid"
"#;

/// A server process tied to the life of the test process.
pub struct ManagedProcess {
    name: String,
    wrapper: Child,
    stdin: Option<ChildStdin>,
    pid_file: PathBuf,
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args...` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log_path: &Path, envs: &[(&str, &str)]) -> Result<Self> {
        let log = File::options().create(true).append(true).open(log_path)?;
        let pid_file = log_path.with_extension("pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("cloudpass-e2e-wrapper")
            .arg(&pid_file)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut wrapper = cmd.spawn().with_context(|| format!("starting {name} ({})", program.display()))?;
        let stdin = wrapper.stdin.take();
        let process = Self { name: name.to_owned(), wrapper, stdin, pid_file, log_path: log_path.to_path_buf() };
        // Wait until the wrapper has written the pid, so pid() is always meaningful.
        let deadline = Instant::now() + Duration::from_secs(5);
        while process.pid().is_none() {
            if Instant::now() > deadline {
                bail!("{name} did not start");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(process)
    }

    /// Name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process ID of the server itself (not of its wrapper).
    pub fn pid(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    /// Whether the server has exited.
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.wrapper.try_wait(), Ok(None))
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `max_bytes` of the log.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        let Ok(mut file) = File::open(&self.log_path) else { return String::new() };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        text
    }

    /// Polls `probe` until it says yes (every 100 ms), failing with the log's tail when
    /// the server exits first or `timeout` passes.
    pub async fn wait_until<F, Fut>(&mut self, what: &str, timeout: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if probe().await {
                return Ok(());
            }
            if self.has_exited() {
                bail!("{} exited before {what}; log tail:\n{}", self.name, self.log_tail(6000));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no {what} after {timeout:?}; {} log tail:\n{}", self.name, self.log_tail(6000))
    }

    /// Kills the server with SIGKILL (no chance to clean up), as a crash or an OOM kill
    /// would, and waits for it.
    pub fn kill_hard(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
        self.stop();
    }

    /// Stops the server and waits for it (at most ~6 s), then kills what is left. Waits
    /// for the server itself, not only its wrapper: on Ctrl-C the whole process group
    /// gets SIGINT, the wrapper shell dies at once, and the server may still be shutting
    /// down.
    pub fn stop(&mut self) {
        let server = self.pid();
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            let wrapper_done = !matches!(self.wrapper.try_wait(), Ok(None));
            if wrapper_done && server.is_none_or(|pid| !is_running(pid)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = server.filter(|pid| is_running(*pid)) {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a process with this ID is still running (not a zombie).
pub fn is_running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Ports [`free_port`] hands out: below the kernel's ephemeral range (32768-60999 by
/// default), from which every outgoing connection takes its local port. A port taken
/// from that range (by binding port 0) could be taken again by some connection between
/// this check and the server's own bind: etcd then failed with "address already in use".
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// A free TCP port on 127.0.0.1 for a server a test starts: a random one of
/// [`TEST_PORTS`] that binds now and that this process has not handed out before.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    for _ in 0..1000 {
        let port = TEST_PORTS.start + (u32::from_le_bytes(cloudpass_rand::bytes::<4>()) % span) as u16;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.contains(&port) || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        handed_out.insert(port);
        return Ok(port);
    }
    // A crowded range: let the kernel pick, as before.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
